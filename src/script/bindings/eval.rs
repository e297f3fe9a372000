//! Evaluation and images in scripts: paired bootstrap intervals, PNG plots, the HTML report,
//! and PNG/JPEG image files.

use rhai::plugin::*;

use crate::eval::grid_options::GridFigureOptions;
use crate::eval::plots::LinePlot;
use crate::eval::BootstrapOptions;
use crate::script::declared::{option_docs, OptionDoc};

/// The options of this module's functions, for `lpo fns`.
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![
        ("paired_bootstrap", option_docs::<BootstrapOptions>()),
        ("line_plot", option_docs::<LinePlot>()),
        ("save_grid", option_docs::<GridFigureOptions>()),
    ]
}

mod helpers {
    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use crate::eval::number::format_number;
    use crate::eval::report::{Figure, Report, Summary};
    use crate::script::convert::dynamic_f64;
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

    /// The (x, y) points of one series.
    pub(super) type Points = Vec<(f64, f64)>;

    /// One series: array of [x, y] pairs, array of numbers or 1-D tensor (x = index), [N, 2]
    /// tensor, or `#{x, y}`.
    pub(super) fn series_points(name: &str, v: &Dynamic) -> Result<Points, String> {
        let what = format!("line_plot: series `{name}`");
        if let Some(m) = v.read_lock::<Map>() {
            return xy_points(&m, &what);
        }
        if let Some(t) = v.clone().try_cast::<Tensor>() {
            let vals = to_f64_vec(&t).map_err(|e| format!("{what}: {e}"))?;
            return match t.dims() {
                [_, 2] => Ok(vals.chunks(2).map(|c| (c[0], c[1])).collect()),
                [_] | [] => Ok(indexed(vals)),
                d => Err(format!("{what}: tensor must be [N] or [N, 2], got {d:?}")),
            };
        }
        if let Some(arr) = v.read_lock::<Array>() {
            if arr.iter().all(|x| x.is_array()) && !arr.is_empty() {
                return pair_points(&arr, &what);
            }
            drop(arr);
            return Ok(indexed(numbers(v, &what)?));
        }
        Err(format!(
            "{what}: expected [[x, y], ...], [y, ...], a tensor or #{{x, y}}, got {}",
            v.type_name()
        ))
    }

    /// Values as points (index, value).
    fn indexed(ys: Vec<f64>) -> Points {
        ys.into_iter()
            .enumerate()
            .map(|(i, y)| (i as f64, y))
            .collect()
    }

    /// `#{x, y}`: two parallel lists of numbers.
    fn xy_points(m: &Map, what: &str) -> Result<Points, String> {
        let get = |k: &str| {
            m.get(k)
                .ok_or_else(|| format!("{what}: map needs `x` and `y`"))
                .and_then(|v| numbers(v, what))
        };
        let (x, y) = (get("x")?, get("y")?);
        if x.len() != y.len() {
            return Err(format!(
                "{what}: x has {} values but y has {}",
                x.len(),
                y.len()
            ));
        }
        Ok(x.into_iter().zip(y).collect())
    }

    /// `[[x, y], ...]`.
    fn pair_points(arr: &Array, what: &str) -> Result<Points, String> {
        arr.iter()
            .enumerate()
            .map(|(i, p)| match numbers(p, what)?.as_slice() {
                [x, y] => Ok((*x, *y)),
                pair => Err(format!(
                    "{what}: point {i} has {} values, not [x, y]",
                    pair.len()
                )),
            })
            .collect()
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

    /// The keys of `write_report`'s map (report content, not options: values may be tensors).
    const REPORT_KEYS: [&str; 5] = ["title", "summary", "table", "notes", "figures"];

    pub(super) fn report_from_map(m: &Map) -> Result<Report, String> {
        if let Some(k) = m.keys().find(|k| !REPORT_KEYS.contains(&k.as_str())) {
            return Err(format!(
                "write_report: unknown key `{k}`; accepted: {}",
                REPORT_KEYS.join(", ")
            ));
        }
        let map_of = |key: &str| -> Result<Option<Map>, String> {
            m.get(key)
                .map(|v| {
                    v.read_lock::<Map>()
                        .map(|m| m.clone())
                        .ok_or_else(|| format!("write_report: `{key}` must be a map"))
                })
                .transpose()
        };
        Ok(Report {
            title: m
                .get("title")
                .map(|v| v.to_string())
                .unwrap_or_else(|| "Report".into()),
            summary: map_of("summary")?
                .map(|s| summary_from_map(&s))
                .transpose()?,
            table: map_of("table")?
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| (k.to_string(), report_value(v)))
                .collect(),
            notes: m.get("notes").map(notes).unwrap_or_default(),
            figures: m
                .get("figures")
                .map(figures)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    /// One note, or an array of them.
    fn notes(v: &Dynamic) -> Vec<String> {
        match v.read_lock::<Array>() {
            Some(a) => a.iter().map(|x| x.to_string()).collect(),
            None => vec![v.to_string()],
        }
    }

    /// Figures: paths, or `#{path, caption}` (the caption defaults to the path).
    fn figures(v: &Dynamic) -> Result<Vec<Figure>, String> {
        let arr = v
            .read_lock::<Array>()
            .ok_or("write_report: `figures` must be an array of paths or #{path, caption}")?;
        arr.iter()
            .enumerate()
            .map(|(i, item)| {
                let Some(fm) = item.read_lock::<Map>() else {
                    let path = item.to_string();
                    return Ok(Figure {
                        caption: path.clone(),
                        path,
                    });
                };
                let path = fm
                    .get("path")
                    .ok_or_else(|| format!("write_report: figure {i} has no `path`"))?
                    .to_string();
                let caption = fm.get("caption").map(|c| c.to_string());
                Ok(Figure {
                    caption: caption.unwrap_or_else(|| path.clone()),
                    path,
                })
            })
            .collect()
    }

    /// The series of `line_plot`, in name order.
    pub(super) fn all_series(series: &Map) -> Result<Vec<(String, Points)>, String> {
        series
            .iter()
            .map(|(k, v)| series_points(k, v).map(|pts| (k.to_string(), pts)))
            .collect()
    }

    /// Plain script values as texts (the keys of `group_mean`).
    pub(super) fn key_texts(keys: &Array) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }
}

#[export_module]
pub mod eval_api {
    use super::helpers::*;

    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use crate::eval::bootstrap::{paired_bootstrap as bootstrap, BootstrapOptions};
    use crate::eval::grid_options::GridFigureOptions;
    use crate::eval::group_mean as group_means;
    use crate::eval::plots::{line_plot_with, LinePlot};
    use crate::image_grid::{grid_size, save_labelled_grid};
    use crate::image_io;
    use crate::script::declared::{from_map, to_map};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// Paired bootstrap 95% CI of mean(after) - mean(before) (tensors or arrays of numbers /
    /// bools, paired by index): `#{delta, ci95_low, ci95_high, before, after, n}`, with the
    /// default options (resamples seeded with the run's seed).
    #[rhai_fn(return_raw)]
    pub fn paired_bootstrap(
        ctx: NativeCallContext,
        before: Dynamic,
        after: Dynamic,
    ) -> ScriptResult<Map> {
        paired_bootstrap_with(ctx, before, after, Map::new())
    }

    /// Paired bootstrap with options `#{samples, seed}`.
    #[rhai_fn(name = "paired_bootstrap", return_raw)]
    pub fn paired_bootstrap_with(
        ctx: NativeCallContext,
        before: Dynamic,
        after: Dynamic,
        opts: Map,
    ) -> ScriptResult<Map> {
        let o: BootstrapOptions = from_map(&opts, "paired_bootstrap").or_script(&ctx)?;
        let host = Host::of(&ctx);
        host.check_tensor_size("paired_bootstrap", &[o.samples], candle_core::DType::F64)
            .or_script(&ctx)?;
        let seed = o.seed.unwrap_or(host.seed as i64) as u64;
        let b = numbers(&before, "paired_bootstrap: before").or_script(&ctx)?;
        let a = numbers(&after, "paired_bootstrap: after").or_script(&ctx)?;
        let r = bootstrap(&b, &a, o.samples, seed).or_script(&ctx)?;
        to_map(&r).or_script(&ctx)
    }

    /// Mean of `values` (tensor or array) per key of the parallel array `keys` (e.g. the
    /// prompt of each image): map key -> `#{mean, n}`.
    #[rhai_fn(return_raw)]
    pub fn group_mean(ctx: NativeCallContext, values: Dynamic, keys: Array) -> ScriptResult<Map> {
        let v = numbers(&values, "group_mean: values").or_script(&ctx)?;
        let means = group_means(&v, &key_texts(&keys)).or_script(&ctx)?;
        to_map(&means).or_script(&ctx)
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

    /// A line plot with options `#{x_label, y_label, width, height}`.
    #[rhai_fn(name = "line_plot", return_raw)]
    pub fn line_plot_opts(
        ctx: NativeCallContext,
        path: &str,
        title: &str,
        series: Map,
        opts: Map,
    ) -> ScriptResult<()> {
        let mut p: LinePlot = from_map(&opts, "line_plot").or_script(&ctx)?;
        p.title = title.to_string();
        let host = Host::of(&ctx);
        host.check_tensor_size(
            "line_plot",
            &[p.height as usize, p.width as usize, 3],
            candle_core::DType::U8,
        )
        .or_script(&ctx)?;
        let path = host.writable(path).or_script(&ctx)?;
        let data = all_series(&series).or_script(&ctx)?;
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

    /// Save a batch [B, 3, H, W] as one PNG grid with `nrow` images per row (the default
    /// padding and magnification).
    #[rhai_fn(return_raw)]
    pub fn save_grid(
        ctx: NativeCallContext,
        images: Tensor,
        path: &str,
        nrow: i64,
    ) -> ScriptResult<()> {
        save_grid_opts(ctx, images, path, nrow, Map::new())
    }

    /// `save_grid` with options `#{padding, upscale, labels: [..], row_labels: [..]}`:
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
        let o: GridFigureOptions = from_map(&opts, "save_grid").or_script(&ctx)?;
        if nrow < 1 {
            return Err(format!("save_grid: nrow must be >= 1, got {nrow}")).or_script(&ctx);
        }
        let (g, labels) = (o.grid(nrow as usize), o.labels());
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

#[cfg(test)]
mod tests {
    use super::declared_options;

    #[test]
    fn eval_options_show_the_core_defaults() {
        let all = declared_options();
        let find = |f: &str, n: &str| {
            let docs = &all.iter().find(|(name, _)| *name == f).unwrap().1;
            docs.iter().find(|d| d.name == n).unwrap().default.clone()
        };
        assert_eq!(find("paired_bootstrap", "samples").as_deref(), Some("2000"));
        assert_eq!(find("line_plot", "width").as_deref(), Some("640"));
        assert_eq!(find("save_grid", "upscale").as_deref(), Some("4"));
        let names = all
            .iter()
            .flat_map(|(_, docs)| docs.iter().map(|d| &d.name));
        assert!(
            names.clone().all(|n| n != "title"),
            "the title is an argument"
        );
    }
}
