//! Evaluation: paired bootstrap on constructed examples, PNG image I/O, plots and the report.

use candle_core::{DType, Device, Tensor};
use lpo::eval::plots::{line_plot_with, LinePlot};
use lpo::eval::report::Figure;
use lpo::eval::{line_plot, paired_bootstrap, write_report, Report, Summary};
use lpo::image_grid::{self, GridLabels, GridOptions};
use lpo::image_io;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use lpo::shapes::{Prompt, ShapesWorld};
use lpo::tensor::SeededRng;

#[test]
fn bootstrap_of_identical_arrays_is_exactly_zero() {
    let mut rng = SeededRng::new(1);
    let x: Vec<f64> = rng
        .uniform_vec(300)
        .into_iter()
        .map(|u| (u > 0.5) as i32 as f64)
        .collect();
    let r = paired_bootstrap(&x, &x, 2000, 7).unwrap();
    assert_eq!((r.delta, r.ci95_low, r.ci95_high), (0.0, 0.0, 0.0));
    assert_eq!(r.n, 300);
    assert!(!r.significant());
}

#[test]
fn bootstrap_detects_a_clear_shift_and_brackets_the_truth() {
    // binary: 30% -> 60% aligned on 1000 paired items
    let mut rng = SeededRng::new(2);
    let u = rng.uniform_vec(1000);
    let before: Vec<f64> = u.iter().map(|&v| (v < 0.3) as i32 as f64).collect();
    let after: Vec<f64> = u.iter().map(|&v| (v < 0.6) as i32 as f64).collect();
    let r = paired_bootstrap(&before, &after, 2000, 3).unwrap();
    assert!((r.delta - (r.after - r.before)).abs() < 1e-12);
    assert!(r.ci95_low > 0.2 && r.ci95_high < 0.4, "{r:?}");
    assert!(r.ci95_low <= r.delta && r.delta <= r.ci95_high);
    // the interval width matches the normal approximation sqrt(p(1-p)/n) * 1.96 * 2
    let p = r.delta;
    let se = (p * (1.0 - p) / 1000.0).sqrt();
    let width = r.ci95_high - r.ci95_low;
    assert!(
        (width - 3.92 * se).abs() < 0.25 * 3.92 * se,
        "width {width} vs {}",
        3.92 * se
    );
    // a graded metric: a downward shift
    let g_before: Vec<f64> = (0..500).map(|i| 0.5 + 0.001 * i as f64).collect();
    let g_after: Vec<f64> = g_before.iter().map(|v| v - 0.1).collect();
    let g = paired_bootstrap(&g_before, &g_after, 500, 1).unwrap();
    assert!((g.ci95_low + 0.1).abs() < 1e-9 && (g.ci95_high + 0.1).abs() < 1e-9 && g.significant());
}

#[test]
fn bootstrap_of_symmetric_changes_includes_zero() {
    // half the items gain one, half lose one: the mean change is 0
    let before: Vec<f64> = (0..400).map(|i| (i % 2) as f64).collect();
    let after: Vec<f64> = (0..400).map(|i| ((i + 1) % 2) as f64).collect();
    let r = paired_bootstrap(&before, &after, 2000, 5).unwrap();
    assert_eq!(r.delta, 0.0);
    assert!(r.ci95_low < 0.0 && r.ci95_high > 0.0, "{r:?}");
    assert!(!r.significant());
}

#[test]
fn bootstrap_is_deterministic_by_seed_and_checks_input() {
    let mut rng = SeededRng::new(9);
    let a: Vec<f64> = rng.uniform_vec(200).into_iter().map(f64::from).collect();
    let b: Vec<f64> = rng.uniform_vec(200).into_iter().map(f64::from).collect();
    let r1 = paired_bootstrap(&a, &b, 1000, 42).unwrap();
    let r2 = paired_bootstrap(&a, &b, 1000, 42).unwrap();
    let r3 = paired_bootstrap(&a, &b, 1000, 43).unwrap();
    assert_eq!(r1, r2);
    assert_ne!((r1.ci95_low, r1.ci95_high), (r3.ci95_low, r3.ci95_high));
    assert!(paired_bootstrap(&a, &b[..10], 100, 0)
        .unwrap_err()
        .to_string()
        .contains("paired"));
    assert!(paired_bootstrap(&[], &[], 100, 0).is_err());
    assert!(paired_bootstrap(&[1.0, f64::NAN], &[1.0, 2.0], 100, 0)
        .unwrap_err()
        .to_string()
        .contains("before[1]"));
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn png_round_trip_batches_and_grids() {
    let dir = tempfile::tempdir().unwrap();
    let w = ShapesWorld::default();
    let p = Prompt::parse("a magenta triangle").unwrap();
    let img = w.render(p, &mut SeededRng::new(1), &Device::Cpu).unwrap();
    let path = dir.path().join("one.png");
    assert_eq!(image_io::save_png(&img, &path).unwrap(), vec![path.clone()]);
    let back = image_io::load_image(&path, 16, &Device::Cpu).unwrap();
    assert_eq!(back.dims(), &[3, 16, 16]);
    let diff = values(&img)
        .iter()
        .zip(values(&back))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1.0 / 127.5 + 1e-5, "round trip error {diff}");

    let batch = w
        .render_batch(&[p; 5], &mut SeededRng::new(2), &Device::Cpu)
        .unwrap();
    let written = image_io::save_png(&batch, &dir.path().join("b.png")).unwrap();
    assert_eq!(written.len(), 5);
    assert!(written[4].ends_with("b_0004.png") && written[4].is_file());
    let templ = image_io::save_png(&batch, &dir.path().join("img{}.png")).unwrap();
    assert!(templ[1].ends_with("img0001.png"));

    let opts = GridOptions {
        nrow: 3,
        padding: 1,
        upscale: 4,
        ..Default::default()
    };
    let (_, gw, gh) = image_grid::make_grid(&batch, opts).unwrap();
    assert_eq!((gw, gh), ((3 * 17 + 1) * 4, (2 * 17 + 1) * 4));
    let gpath = dir.path().join("grid.png");
    image_grid::save_grid(&batch, &gpath, opts).unwrap();
    let decoded = image_io::read_rgb(&gpath).unwrap();
    assert_eq!(decoded.dimensions(), (gw as u32, gh as u32));
    assert!(image_io::save_png(
        &Tensor::zeros((2, 16, 16), DType::F32, &Device::Cpu).unwrap(),
        &path
    )
    .is_err());
}

#[test]
fn load_resizes_and_center_crops() {
    let dir = tempfile::tempdir().unwrap();
    // 40x20: left half red, right half blue
    let mut img = image::RgbImage::new(40, 20);
    for (x, _, px) in img.enumerate_pixels_mut() {
        *px = if x < 20 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        };
    }
    let path = dir.path().join("wide.png");
    img.save(&path).unwrap();
    let t = image_io::load_image(&path, 10, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 10, 10]);
    let v = values(&t);
    let at = |c: usize, y: usize, x: usize| v[c * 100 + y * 10 + x];
    // resized to 20x10, centre crop keeps x in 5..15: left column red, right column blue
    assert!(
        at(0, 5, 0) > 0.9 && at(2, 5, 0) < -0.9,
        "{} {}",
        at(0, 5, 0),
        at(2, 5, 0)
    );
    assert!(at(2, 5, 9) > 0.9 && at(0, 5, 9) < -0.9);
    // a JPEG of a constant colour stays that colour
    let jpg = dir.path().join("grey.jpg");
    image::RgbImage::from_pixel(30, 50, image::Rgb([128, 128, 128]))
        .save(&jpg)
        .unwrap();
    let g = image_io::load_image(&jpg, 16, &Device::Cpu).unwrap();
    assert!(values(&g).iter().all(|x| x.abs() < 0.03));
    // undecodable and missing files name the path
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"not an image at all").unwrap();
    let e = format!(
        "{:#}",
        image_io::load_image(&bad, 16, &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("broken.png"), "{e}");
    let e = format!(
        "{:#}",
        image_io::load_image(&dir.path().join("nope.png"), 16, &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("nope.png"), "{e}");
}

#[test]
fn line_plot_draws_lines_and_text_without_system_fonts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    let series = vec![
        (
            "loss".to_string(),
            (0..50)
                .map(|i| (i as f64, (-(i as f64) / 10.0).exp()))
                .collect::<Vec<_>>(),
        ),
        (
            "acc".to_string(),
            (0..50)
                .map(|i| (i as f64, 0.5 + i as f64 / 100.0))
                .collect(),
        ),
        ("empty".to_string(), vec![]),
        ("nan".to_string(), vec![(1.0, f64::NAN)]),
    ];
    line_plot(&path, "Training loss", &series).unwrap();
    let img = image_io::read_rgb(&path).unwrap();
    assert_eq!(img.dimensions(), (640, 400));
    // the title band (top 30 rows, centre) holds dark text pixels
    let dark_title = (0..30u32)
        .flat_map(|y| (200..440u32).map(move |x| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
        .count();
    assert!(
        dark_title > 30,
        "title text not drawn ({dark_title} dark pixels)"
    );
    // the first series colour appears
    let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
    assert!(blue > 100, "series line not drawn ({blue})");
    // axis labels and constant / single-point series
    let mut o = LinePlot::new("const");
    o.x_label = "step".into();
    o.y_label = "value".into();
    line_plot_with(
        &dir.path().join("c.png"),
        &o,
        &[
            ("c".into(), vec![(0.0, 1.0), (1.0, 1.0)]),
            ("p".into(), vec![(0.5, 2.0)]),
        ],
    )
    .unwrap();
    line_plot(&dir.path().join("none.png"), "nothing", &[]).unwrap();
}

#[test]
fn line_plot_legend_sits_under_the_chart_not_over_the_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rising.png");
    // Both series end in the upper right, where a legend inside the chart used to be drawn.
    let rising: Vec<(f64, f64)> = (0..20).map(|i| (i as f64, i as f64)).collect();
    let series = vec![
        ("first_series".to_string(), rising.clone()),
        ("second_series".to_string(), rising),
    ];
    line_plot(&path, "rising", &series).unwrap();
    let img = image_io::read_rgb(&path).unwrap();
    let (w, h) = img.dimensions();
    let is_dark = |x: u32, y: u32| img.get_pixel(x, y).0.iter().all(|&c| c < 60);
    // Upper-right quarter of the chart: lines and grid only, no legend box or text.
    let dark_in_chart = (40..h / 2)
        .flat_map(|y| (w / 2..w - 40).map(move |x| (x, y)))
        .filter(|&(x, y)| is_dark(x, y))
        .count();
    assert_eq!(dark_in_chart, 0, "legend drawn over the lines");
    // The legend band at the bottom holds both swatch colours and the names.
    let band = |colour: [u8; 3]| {
        (h - 20..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0 == colour)
            .count()
    };
    assert!(band([31, 119, 180]) > 20, "first swatch missing");
    assert!(band([255, 127, 14]) > 20, "second swatch missing");
    let text = (h - 20..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| is_dark(x, y))
        .count();
    assert!(text > 100, "legend names missing ({text} dark pixels)");
    // The first series is drawn wider: where the two coincide, its colour still shows.
    let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
    assert!(
        blue > 200,
        "a series hidden under an identical one ({blue})"
    );
}

#[test]
fn grid_labels_draw_a_row_band_and_captions() {
    let w = ShapesWorld::default();
    let p = Prompt::parse("a magenta triangle").unwrap();
    let batch = w
        .render_batch(&[p; 4], &mut SeededRng::new(2), &Device::Cpu)
        .unwrap();
    let opts = GridOptions {
        nrow: 2,
        padding: 1,
        upscale: 4,
        ..Default::default()
    };
    let (plain, pw, ph) = image_grid::make_grid(&batch, opts).unwrap();
    let labels = GridLabels {
        captions: vec![
            "".into(),
            "".into(),
            "a magenta triangle".into(),
            "#3".into(),
        ],
        rows: vec!["before".into(), "after".into()],
    };
    let (rgb, gw, gh) = image_grid::make_labelled_grid(&batch, opts, &labels).unwrap();
    assert_eq!(
        image_grid::grid_size(4, 16, 16, &opts, &labels).unwrap(),
        (gw, gh)
    );
    assert!(gw > pw && gh > ph, "no room made for labels");
    let px = |x: usize, y: usize| &rgb[(y * gw + x) * 3..(y * gw + x) * 3 + 3];
    let dark = |x0: usize, x1: usize, y0: usize, y1: usize| {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| px(x, y).iter().all(|&c| c < 60))
            .count()
    };
    let band_w = gw - pw;
    // The row-label band: white, with text beside each row's images (64 px high, from y 4).
    assert_eq!(px(0, 0), [255, 255, 255]);
    assert!(dark(0, band_w, 4, 68) > 40, "row label `before` not drawn");
    // Row 0 has no captions: row 1's images start right under it.
    assert_eq!(
        &rgb[(72 * gw + band_w + 4) * 3..(72 * gw + band_w + 4) * 3 + 3],
        &plain[(72 * pw + 4) * 3..(72 * pw + 4) * 3 + 3],
        "an image moved"
    );
    assert!(dark(0, band_w, 72, 136) > 40, "row label `after` not drawn");
    // Row 1's caption band: under its images, white with text (two lines for the long one).
    let caption_top = 136;
    assert_eq!(px(band_w + 4, caption_top + 1), [255, 255, 255]);
    assert!(
        dark(band_w + 4, band_w + 68, caption_top, gh - 4) > 60,
        "caption not drawn"
    );
    assert!(
        gh - 4 - caption_top >= 20,
        "long caption not wrapped onto two lines"
    );
    // Miscounted labels are refused, naming what is wrong.
    let bad = GridLabels {
        captions: vec!["one".into()],
        rows: vec![],
    };
    let e = image_grid::make_labelled_grid(&batch, opts, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 captions for 4 images"), "{e}");
    let bad = GridLabels {
        captions: vec![],
        rows: vec!["only".into()],
    };
    let e = image_grid::make_labelled_grid(&batch, opts, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 row labels for 2 rows"), "{e}");
}

#[test]
fn report_settings_wrap_nested_values_and_format_numbers_by_magnitude() {
    let dir = tempfile::tempdir().unwrap();
    let b = paired_bootstrap(&[0.0, 0.0, 1.0, 0.0], &[1.0, 1.0, 1.0, 0.0], 500, 0).unwrap();
    let mut summary = Summary::from_bootstrap(&b);
    summary.extra.insert("lr".into(), serde_json::json!(1e-5));
    summary.extra.insert(
        "per_prompt".into(),
        serde_json::json!({
            "a red circle with a very long prompt that goes on": {"mean": 0.30000000000000004, "n": 2},
            "a blue square": {"mean": 2.5e-7, "n": 2},
            "a green triangle": {"mean": 1.0, "n": 2}
        }),
    );
    let report = Report {
        title: "settings".into(),
        summary: Some(summary),
        table: vec![
            ("beta".into(), serde_json::json!(500)),
            (
                "threshold".into(),
                serde_json::json!({"min": 0.1, "max": 0.2}),
            ),
        ],
        ..Default::default()
    };
    let html = std::fs::read_to_string(write_report(dir.path(), &report).unwrap()).unwrap();
    assert!(
        html.contains("table-layout:fixed"),
        "table layout not fixed"
    );
    assert!(
        html.contains("white-space:pre-wrap") && html.contains("overflow-wrap:anywhere"),
        "nested values do not wrap"
    );
    assert!(html.contains("<th>lr</th><td>1e-5</td>"), "lr: {html}");
    assert!(!html.contains("0.0000"), "fixed decimals left: {html}");
    assert!(html.contains("<th>beta</th><td>500</td>"));
    // Nested maps: an indented <pre>, numbers by magnitude, short maps on one line.
    assert!(html.contains("<pre class=\"json\">{\n  &quot;a blue square&quot;: {&quot;mean&quot;: 2.5e-7, &quot;n&quot;: 2},"), "{html}");
    assert!(html.contains("&quot;mean&quot;: 0.3,"), "{html}");
    assert!(
        html.contains("<pre class=\"json\">{&quot;max&quot;: 0.2, &quot;min&quot;: 0.1}</pre>"),
        "{html}"
    );
    // The headline: signed changes, no fixed four decimals.
    assert!(html.contains("<b>Change +0.5</b>"), "{html}");
}

#[test]
fn report_writes_summary_and_html() {
    let dir = tempfile::tempdir().unwrap();
    line_plot(
        &dir.path().join("plot.png"),
        "p",
        &[("a".into(), vec![(0.0, 0.0), (1.0, 1.0)])],
    )
    .unwrap();
    let b = paired_bootstrap(&[0.0, 0.0, 1.0, 0.0], &[1.0, 1.0, 1.0, 0.0], 500, 0).unwrap();
    let mut summary = Summary::from_bootstrap(&b);
    summary
        .extra
        .insert("prompts".into(), serde_json::json!("train"));
    let report = Report {
        title: "Shapes <LPO>".into(),
        notes: vec!["alignment & more".into()],
        summary: Some(summary),
        table: vec![("lr".into(), serde_json::json!(5e-5))],
        figures: vec![Figure {
            path: "plot.png".into(),
            caption: "loss".into(),
        }],
    };
    let html_path = write_report(dir.path(), &report).unwrap();
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(
        html.contains("<img src=\"plot.png\"")
            && html.contains("Shapes &lt;LPO&gt;")
            && html.contains("alignment &amp; more")
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(json["n"], 4);
    assert_eq!(json["before"], 0.25);
    assert_eq!(json["after"], 0.75);
    assert_eq!(json["delta"], 0.5);
    assert!(
        json["ci95_low"].as_f64().unwrap() <= 0.5 && json["ci95_high"].as_f64().unwrap() >= 0.5
    );
    assert_eq!(json["prompts"], "train");
    let missing = Report {
        figures: vec![Figure {
            path: "gone.png".into(),
            caption: String::new(),
        }],
        ..Default::default()
    };
    assert!(write_report(dir.path(), &missing)
        .unwrap_err()
        .to_string()
        .contains("gone.png"));
}

#[test]
fn script_api_bootstrap_plots_images_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().to_string();
    let e = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    );
    let script = format!(
        r#"
        let dir = "{d}";
        let b = paired_bootstrap([0, 0, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 1, 1, 0], #{{samples: 1000, seed: 3}});
        let same = paired_bootstrap(tensor([0.5, 0.25]), tensor([0.5, 0.25]));
        if same.ci95_low != 0.0 || same.ci95_high != 0.0 {{ throw "identical not zero"; }}
        let b2 = paired_bootstrap([0, 0, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 1, 1, 0], #{{samples: 1000, seed: 3}});
        if b.ci95_low != b2.ci95_low {{ throw "not deterministic"; }}
        line_plot(dir + "/loss.png", "loss", #{{train: [[0, 1.0], [1, 0.5], [2, 0.25]], heldout: [0.9, 0.6, 0.4], t: tensor([1.0, 2.0])}});
        line_plot(dir + "/acc.png", "acc", #{{acc: #{{x: [0, 10, 20], y: [0.5, 0.6, 0.7]}}}}, #{{x_label: "step", y_label: "accuracy"}});
        let w = shapes_world();
        let x = w.render_batch(w.prompts, rng(1));
        save_grid(x, dir + "/grid.png", 6);
        save_grid(x, dir + "/grid_big.png", 6, #{{padding: 2, upscale: 8}});
        save_grid(x.narrow(0, 0, 4), dir + "/grid_labelled.png", 2, #{{labels: ["a", "b", 3, 4], row_labels: ["before", "after"]}});
        let files = save_png(x.narrow(0, 0, 2), dir + "/img.png");
        let back = load_image(files[0], 16);
        if max_abs_diff(back, x.narrow(0, 0, 1).reshape([3, 16, 16])) > 0.01 {{ throw "round trip"; }}
        let html = write_report(dir, #{{title: "t", summary: b, figures: ["loss.png", #{{path: "grid.png", caption: "samples"}}], table: #{{lr: 0.00005}}, notes: ["n1", "n2"]}});
        let g = group_mean([1, 0, 1, 1], ["a", "b", "a", "b"]);
        if g.a.mean != 1.0 || g.b.mean != 0.5 || g.b.n != 2 {{ throw "group_mean " + g; }}
        b.delta
        "#
    );
    let delta: f64 = e.engine.eval(&script).unwrap();
    assert_eq!(delta, 0.5);
    for f in [
        "loss.png",
        "acc.png",
        "grid.png",
        "grid_big.png",
        "img_0000.png",
        "img_0001.png",
        "report.html",
        "summary.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        image_io::read_rgb(&dir.path().join("grid.png"))
            .unwrap()
            .dimensions(),
        ((6 * 17 + 1) * 4, (3 * 17 + 1) * 4)
    );
    let labelled = image_io::read_rgb(&dir.path().join("grid_labelled.png")).unwrap();
    assert!(labelled.width() > (2 * 17 + 1) * 4, "row labels not drawn");
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("<th>lr</th><td>5e-5</td>"), "{html}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(json["n"], 8);
    let err = e
        .engine
        .eval::<rhai::Dynamic>(&format!(
            "save_grid(zeros([3, 3, 4, 4]), \"{d}/g.png\", 3, #{{row_labels: [\"a\", \"b\"]}})"
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 row labels for 1 rows"), "{err}");
    let err = e
        .engine
        .eval::<rhai::Dynamic>(&format!("\nload_image(\"{d}/missing.png\", 16)"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.png") && err.contains("line 2"),
        "{err}"
    );
    let err = e
        .engine
        .eval::<rhai::Dynamic>("paired_bootstrap([1, 2], [1])")
        .unwrap_err()
        .to_string();
    assert!(err.contains("paired"), "{err}");
}
