//! Evaluation and images in scripts: paired bootstrap intervals, PNG plots, the HTML report,
//! and PNG/JPEG image files.

use rhai::plugin::*;

mod helpers {
    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use crate::eval::number::format_number;
    use crate::eval::report::{Figure, Report, Summary};
    use crate::script::options::{dynamic_f64, Options};
    use crate::tensor::ops::to_f64_vec;

    /// Numbers from a tensor (flattened) or an array of numbers / bools.
    pub(super) fn numbers(v: &Dynamic, what: &str) -> Result<Vec<f64>, String> {
        if let Some(t) = v.clone().try_cast::<Tensor>() {
            return to_f64_vec(&t).map_err(|e| format!("{what}: {e}"));
        }
        if v.is_array() {
            let arr = v.read_lock::<Array>().expect("checked is_array");
            return arr
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    dynamic_f64(x)
                        .or_else(|| x.as_bool().ok().map(|b| b as i64 as f64))
                        .ok_or_else(|| {
                            format!("{what}: element {i} is a {}, not a number", x.type_name())
                        })
                })
                .collect();
        }
        Err(format!(
            "{what}: expected a tensor or an array of numbers, got {}",
            v.type_name()
        ))
    }

    /// One series: array of [x, y] pairs, array of numbers or 1-D tensor (x = index), [N, 2]
    /// tensor, or `#{x, y}`.
    pub(super) fn series_points(name: &str, v: &Dynamic) -> Result<Vec<(f64, f64)>, String> {
        let what = format!("line_plot: series `{name}`");
        if v.is_map() {
            let m = v.read_lock::<Map>().expect("checked is_map");
            let x = m
                .get("x")
                .ok_or_else(|| format!("{what}: map needs `x` and `y`"))?;
            let y = m
                .get("y")
                .ok_or_else(|| format!("{what}: map needs `x` and `y`"))?;
            let (x, y) = (numbers(x, &what)?, numbers(y, &what)?);
            if x.len() != y.len() {
                return Err(format!(
                    "{what}: x has {} values but y has {}",
                    x.len(),
                    y.len()
                ));
            }
            return Ok(x.into_iter().zip(y).collect());
        }
        if let Some(t) = v.clone().try_cast::<Tensor>() {
            let vals = to_f64_vec(&t).map_err(|e| format!("{what}: {e}"))?;
            return match t.dims() {
                [_, 2] => Ok(vals.chunks(2).map(|c| (c[0], c[1])).collect()),
                [_] | [] => Ok(vals
                    .into_iter()
                    .enumerate()
                    .map(|(i, y)| (i as f64, y))
                    .collect()),
                d => Err(format!("{what}: tensor must be [N] or [N, 2], got {d:?}")),
            };
        }
        if v.is_array() {
            let arr = v.read_lock::<Array>().expect("checked is_array");
            if arr.iter().all(|x| x.is_array()) && !arr.is_empty() {
                return arr
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let pair = numbers(p, &what)?;
                        match pair.as_slice() {
                            [x, y] => Ok((*x, *y)),
                            _ => Err(format!(
                                "{what}: point {i} has {} values, not [x, y]",
                                pair.len()
                            )),
                        }
                    })
                    .collect();
            }
            drop(arr);
            return Ok(numbers(v, &what)?
                .into_iter()
                .enumerate()
                .map(|(i, y)| (i as f64, y))
                .collect());
        }
        Err(format!(
            "{what}: expected [[x, y], ...], [y, ...], a tensor or #{{x, y}}, got {}",
            v.type_name()
        ))
    }

    /// A script value as a report value: numbers (and one-element tensors) stay numbers, maps
    /// and arrays become JSON (shown indented), anything else its text.
    pub(super) fn report_value(v: &Dynamic) -> serde_json::Value {
        let number = |f: f64| {
            serde_json::Number::from_f64(f)
                .map(serde_json::Value::Number)
                .unwrap_or_else(|| serde_json::Value::String(format_number(f)))
        };
        if let Ok(f) = v.as_float() {
            return number(f);
        }
        if let Some(t) = v.clone().try_cast::<Tensor>() {
            return match to_f64_vec(&t) {
                Ok(vals) if vals.len() == 1 => number(vals[0]),
                _ => serde_json::Value::String(format!("tensor {:?}", t.dims())),
            };
        }
        rhai::serde::from_dynamic(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()))
    }

    /// The array option `key` as texts (strings, or numbers such as indices, as written).
    pub(super) fn texts(o: &Options, key: &str) -> Result<Vec<String>, String> {
        Ok(o.opt_typed::<Array>(key, "an array of strings")?
            .unwrap_or_default()
            .iter()
            .map(|v| v.clone().into_string().unwrap_or_else(|_| v.to_string()))
            .collect())
    }

    pub(super) fn summary_from_map(m: &Map) -> Result<Summary, String> {
        let get = |k: &str| -> Result<f64, String> {
            let v = m.get(k).ok_or_else(|| format!("write_report: summary needs `{k}` (n, before, after, delta, ci95_low, ci95_high)"))?;
            dynamic_f64(v).ok_or_else(|| {
                format!(
                    "write_report: summary `{k}` must be a number, got {}",
                    v.type_name()
                )
            })
        };
        let n = get("n")?;
        if n < 0.0 || n.fract() != 0.0 {
            return Err(format!(
                "write_report: summary `n` must be a non-negative integer, got {n}"
            ));
        }
        let mut extra = serde_json::Map::new();
        for (k, v) in m {
            if ["n", "before", "after", "delta", "ci95_low", "ci95_high"].contains(&k.as_str()) {
                continue;
            }
            extra.insert(k.to_string(), report_value(v));
        }
        Ok(Summary {
            n: n as usize,
            before: get("before")?,
            after: get("after")?,
            delta: get("delta")?,
            ci95_low: get("ci95_low")?,
            ci95_high: get("ci95_high")?,
            extra,
        })
    }

    pub(super) fn report_from_map(m: &Map) -> Result<Report, String> {
        const KEYS: [&str; 5] = ["title", "summary", "table", "notes", "figures"];
        if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(format!(
                "write_report: unknown key `{k}`; accepted: {}",
                KEYS.join(", ")
            ));
        }
        let mut r = Report {
            title: m
                .get("title")
                .map(|v| v.to_string())
                .unwrap_or_else(|| "Report".into()),
            ..Default::default()
        };
        if let Some(s) = m.get("summary") {
            let sm = s
                .read_lock::<Map>()
                .ok_or("write_report: `summary` must be a map")?;
            r.summary = Some(summary_from_map(&sm)?);
        }
        if let Some(t) = m.get("table") {
            let tm = t
                .read_lock::<Map>()
                .ok_or("write_report: `table` must be a map")?;
            r.table = tm
                .iter()
                .map(|(k, v)| (k.to_string(), report_value(v)))
                .collect();
        }
        if let Some(n) = m.get("notes") {
            if n.is_array() {
                r.notes = n
                    .read_lock::<Array>()
                    .expect("array")
                    .iter()
                    .map(|x| x.to_string())
                    .collect();
            } else {
                r.notes = vec![n.to_string()];
            }
        }
        if let Some(f) = m.get("figures") {
            let arr = f
                .read_lock::<Array>()
                .ok_or("write_report: `figures` must be an array of paths or #{path, caption}")?;
            for (i, item) in arr.iter().enumerate() {
                if item.is_map() {
                    let fm = item.read_lock::<Map>().expect("map");
                    let path = fm
                        .get("path")
                        .ok_or_else(|| format!("write_report: figure {i} has no `path`"))?
                        .to_string();
                    let caption = fm
                        .get("caption")
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| path.clone());
                    r.figures.push(Figure { path, caption });
                } else {
                    let path = item.to_string();
                    r.figures.push(Figure {
                        caption: path.clone(),
                        path,
                    });
                }
            }
        }
        Ok(r)
    }
}

#[export_module]
pub mod eval_api {
    use super::helpers::*;

    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use crate::eval::bootstrap::{paired_bootstrap as bootstrap, DEFAULT_SAMPLES};
    use crate::eval::plots::{line_plot_with, LinePlot};
    use crate::image_grid::{grid_size, save_labelled_grid, GridLabels, GridOptions};
    use crate::image_io;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;
    use crate::script::Options;

    /// Paired bootstrap 95% CI of mean(after) - mean(before) (tensors or arrays of numbers /
    /// bools, paired by index): `#{delta, ci95_low, ci95_high, before, after, n}`; 2000 resamples,
    /// seeded with the run's seed.
    #[rhai_fn(return_raw)]
    pub fn paired_bootstrap(
        ctx: NativeCallContext,
        before: Dynamic,
        after: Dynamic,
    ) -> ScriptResult<Map> {
        paired_bootstrap_with(ctx, before, after, Map::new())
    }

    /// Paired bootstrap with options `#{samples: 2000, seed}`.
    #[rhai_fn(name = "paired_bootstrap", return_raw)]
    pub fn paired_bootstrap_with(
        ctx: NativeCallContext,
        before: Dynamic,
        after: Dynamic,
        opts: Map,
    ) -> ScriptResult<Map> {
        let o = Options::new(&opts, "paired_bootstrap", &["samples", "seed"]).or_script(&ctx)?;
        let samples = o.usize("samples", DEFAULT_SAMPLES).or_script(&ctx)?;
        Host::of(&ctx)
            .check_tensor_size("paired_bootstrap", &[samples], candle_core::DType::F64)
            .or_script(&ctx)?;
        let seed = o.i64("seed", Host::of(&ctx).seed as i64).or_script(&ctx)?;
        let b = numbers(&before, "paired_bootstrap: before").or_script(&ctx)?;
        let a = numbers(&after, "paired_bootstrap: after").or_script(&ctx)?;
        let r = bootstrap(&b, &a, samples, seed as u64).or_script(&ctx)?;
        let mut m = Map::new();
        m.insert("n".into(), Dynamic::from(r.n as i64));
        m.insert("before".into(), Dynamic::from(r.before));
        m.insert("after".into(), Dynamic::from(r.after));
        m.insert("delta".into(), Dynamic::from(r.delta));
        m.insert("ci95_low".into(), Dynamic::from(r.ci95_low));
        m.insert("ci95_high".into(), Dynamic::from(r.ci95_high));
        m.insert("samples".into(), Dynamic::from(r.samples as i64));
        Ok(m)
    }

    /// Mean of `values` (tensor or array) per key of the parallel array `keys` (e.g. the
    /// prompt of each image): map key -> `#{mean, n}`.
    #[rhai_fn(return_raw)]
    pub fn group_mean(ctx: NativeCallContext, values: Dynamic, keys: Array) -> ScriptResult<Map> {
        let v = numbers(&values, "group_mean: values").or_script(&ctx)?;
        if v.len() != keys.len() {
            return Err(format!(
                "group_mean: {} values but {} keys",
                v.len(),
                keys.len()
            ))
            .or_script(&ctx);
        }
        let mut acc: std::collections::BTreeMap<String, (f64, i64)> = Default::default();
        for (x, k) in v.iter().zip(&keys) {
            let e = acc.entry(k.to_string()).or_default();
            e.0 += x;
            e.1 += 1;
        }
        Ok(acc
            .into_iter()
            .map(|(k, (sum, n))| {
                let mut m = Map::new();
                m.insert("mean".into(), Dynamic::from(sum / n as f64));
                m.insert("n".into(), Dynamic::from(n));
                (k.into(), Dynamic::from_map(m))
            })
            .collect())
    }

    /// A PNG line plot of a map name -> series ([[x, y], ...], [y, ...], a tensor, or #{x, y}).
    #[rhai_fn(return_raw)]
    pub fn line_plot(
        ctx: NativeCallContext,
        path: &str,
        title: &str,
        series: Map,
    ) -> ScriptResult<()> {
        line_plot_opts(ctx, path, title, series, Map::new())
    }

    /// A line plot with options `#{x_label, y_label, width: 640, height: 400}`.
    #[rhai_fn(name = "line_plot", return_raw)]
    pub fn line_plot_opts(
        ctx: NativeCallContext,
        path: &str,
        title: &str,
        series: Map,
        opts: Map,
    ) -> ScriptResult<()> {
        let o = Options::new(
            &opts,
            "line_plot",
            &["x_label", "y_label", "width", "height"],
        )
        .or_script(&ctx)?;
        let mut p = LinePlot::new(title);
        p.x_label = o.string("x_label", "").or_script(&ctx)?;
        p.y_label = o.string("y_label", "").or_script(&ctx)?;
        p.width = o.usize("width", 640).or_script(&ctx)? as u32;
        p.height = o.usize("height", 400).or_script(&ctx)? as u32;
        let host = Host::of(&ctx);
        host.check_tensor_size(
            "line_plot",
            &[p.height as usize, p.width as usize, 3],
            candle_core::DType::U8,
        )
        .or_script(&ctx)?;
        let path = host.writable(path).or_script(&ctx)?;
        let data = series
            .iter()
            .map(|(k, v)| series_points(k, v).map(|pts| (k.to_string(), pts)))
            .collect::<Result<Vec<_>, _>>()
            .or_script(&ctx)?;
        line_plot_with(&path, &p, &data).or_script(&ctx)
    }

    /// Write `dir/report.html` (and `dir/summary.json` from `summary`) from `#{title, summary:
    /// #{n, before, after, delta, ci95_low, ci95_high, ...}, table: #{..}, notes, figures:
    /// [path or #{path, caption}]}` (figure paths relative to `dir`). Returns the HTML path.
    #[rhai_fn(return_raw)]
    pub fn write_report(ctx: NativeCallContext, dir: &str, report: Map) -> ScriptResult<String> {
        let r = report_from_map(&report).or_script(&ctx)?;
        let path =
            crate::eval::report::write_report(&Host::of(&ctx).writable(dir).or_script(&ctx)?, &r)
                .or_script(&ctx)?;
        Ok(path.to_string_lossy().to_string())
    }

    /// Write a summary map (n, before, after, delta, ci95_low, ci95_high, extra fields) as JSON.
    #[rhai_fn(return_raw)]
    pub fn write_summary(ctx: NativeCallContext, path: &str, summary: Map) -> ScriptResult<()> {
        let s = summary_from_map(&summary).or_script(&ctx)?;
        crate::eval::report::write_summary(&Host::of(&ctx).writable(path).or_script(&ctx)?, &s)
            .or_script(&ctx)
    }

    /// Save [3, H, W] in [-1, 1] as a PNG, or [B, 3, H, W] as B PNGs (`{}` in the name becomes
    /// the index, else `_0000`... before the extension). Returns the paths written.
    #[rhai_fn(return_raw)]
    pub fn save_png(ctx: NativeCallContext, images: Tensor, path: &str) -> ScriptResult<Array> {
        let paths = image_io::save_png(&images, &Host::of(&ctx).writable(path).or_script(&ctx)?)
            .or_script(&ctx)?;
        Ok(paths
            .into_iter()
            .map(|p| Dynamic::from(p.to_string_lossy().to_string()))
            .collect())
    }

    /// Save a batch [B, 3, H, W] as one PNG grid with `nrow` images per row (4x magnified,
    /// 1 px padding).
    #[rhai_fn(return_raw)]
    pub fn save_grid(
        ctx: NativeCallContext,
        images: Tensor,
        path: &str,
        nrow: i64,
    ) -> ScriptResult<()> {
        save_grid_opts(ctx, images, path, nrow, Map::new())
    }

    /// `save_grid` with options `#{padding: 1, upscale: 4, labels: [..], row_labels: [..]}`:
    /// `labels` captions each image (e.g. its prompt; "" for none), `row_labels` names each row
    /// (e.g. "before" / "after").
    #[rhai_fn(name = "save_grid", return_raw)]
    pub fn save_grid_opts(
        ctx: NativeCallContext,
        images: Tensor,
        path: &str,
        nrow: i64,
        opts: Map,
    ) -> ScriptResult<()> {
        let o = Options::new(
            &opts,
            "save_grid",
            &["padding", "upscale", "labels", "row_labels"],
        )
        .or_script(&ctx)?;
        if nrow < 1 {
            return Err(format!("save_grid: nrow must be >= 1, got {nrow}")).or_script(&ctx);
        }
        let g = GridOptions {
            nrow: nrow as usize,
            padding: o.usize("padding", 1).or_script(&ctx)?,
            upscale: o.usize("upscale", 4).or_script(&ctx)?,
            ..Default::default()
        };
        let labels = GridLabels {
            captions: texts(&o, "labels").or_script(&ctx)?,
            rows: texts(&o, "row_labels").or_script(&ctx)?,
        };
        let host = Host::of(&ctx);
        if let [b, _, h, w] = images.dims() {
            let (gw, gh) = grid_size(*b, *h, *w, &g, &labels)
                .map_err(|e| format!("save_grid {path}: {e}"))
                .or_script(&ctx)?;
            host.check_tensor_size("save_grid", &[gh, gw, 3], candle_core::DType::U8)
                .or_script(&ctx)?;
        }
        let path = host.writable(path).or_script(&ctx)?;
        save_labelled_grid(&images, &path, g, &labels)
            .map_err(|e| format!("save_grid {}: {e}", path.display()))
            .or_script(&ctx)
    }

    /// Load a PNG/JPEG as [3, size, size] in [-1, 1] (bilinear resize of the shorter side,
    /// centre crop).
    #[rhai_fn(return_raw, volatile)]
    pub fn load_image(ctx: NativeCallContext, path: &str, size: i64) -> ScriptResult<Tensor> {
        if size < 1 {
            return Err(format!("load_image {path}: size must be >= 1, got {size}"))
                .or_script(&ctx);
        }
        let host = Host::of(&ctx);
        host.check_tensor_size(
            "load_image",
            &[3, size as usize, size as usize],
            candle_core::DType::F32,
        )
        .or_script(&ctx)?;
        let file = host.readable(path).or_script(&ctx)?;
        image_io::load_image(&file, size as usize, &host.device).or_script(&ctx)
    }
}
