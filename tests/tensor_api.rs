//! The tensor layer of the script API (API.md "Tensors and randomness") through real scripts:
//! known values, broadcasting, int/float operators on both sides, PyTorch semantics of
//! sort/gather/index_select, seeded rng, safetensors, error positions, and bad input.

use candle_core::{DType, Device, Tensor};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use rhai::{Dynamic, Engine, EvalAltResult};

fn engine_with_seed(seed: u64) -> Engine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, seed),
        &EngineOptions::default(),
    )
    .engine
}

fn engine() -> Engine {
    engine_with_seed(0)
}

/// Evaluate a script returning a tensor: (dims, dtype name, values as f64).
fn eval_t(e: &Engine, script: &str) -> (Vec<usize>, String, Vec<f64>) {
    let t: Tensor = e
        .eval(script)
        .unwrap_or_else(|err| panic!("{script}: {err}"));
    let v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (t.dims().to_vec(), t.dtype().as_str().to_string(), v)
}

fn check(e: &Engine, script: &str, dims: &[usize], dtype: &str, expected: &[f64]) {
    let (d, t, v) = eval_t(e, script);
    assert_eq!(d, dims, "{script}: shape");
    assert_eq!(t, dtype, "{script}: dtype");
    assert_eq!(v.len(), expected.len(), "{script}: {v:?}");
    for (a, b) in v.iter().zip(expected) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{script}: got {v:?}, expected {expected:?}"
        );
    }
}

#[test]
fn construction_and_inspection() {
    let e = engine();
    check(
        &e,
        "tensor([[1, 2], [3, 4]])",
        &[2, 2],
        "i64",
        &[1., 2., 3., 4.],
    );
    check(&e, "tensor([1, 2.5])", &[2], "f32", &[1., 2.5]);
    check(&e, "zeros([2, 3])", &[2, 3], "f32", &[0.; 6]);
    check(&e, "ones([3])", &[3], "f32", &[1.; 3]);
    check(&e, "arange(2, 5)", &[3], "f32", &[2., 3., 4.]);
    check(&e, "tensor(3.5)", &[], "f32", &[3.5]);
    let shape: rhai::Array = e.eval("zeros([4, 1, 2]).shape").unwrap();
    assert_eq!(
        shape
            .iter()
            .map(|d| d.as_int().unwrap())
            .collect::<Vec<_>>(),
        vec![4, 1, 2]
    );
    assert_eq!(e.eval::<String>("tensor([1, 2]).dtype").unwrap(), "i64");
    assert_eq!(e.eval::<String>("tensor([1.0]).dtype").unwrap(), "f32");
    assert_eq!(
        e.eval::<String>(r#"ones([2]).to_dtype("f16").dtype"#)
            .unwrap(),
        "f16"
    );
    let arr: rhai::Array = e.eval("tensor([[1, 2], [3, 4]]).to_array()").unwrap();
    assert_eq!(arr[1].clone().into_array().unwrap()[0].as_int().unwrap(), 3);
    let arr: rhai::Array = e.eval("tensor([0.5, 1.5]).to_array()").unwrap();
    assert_eq!(arr[1].as_float().unwrap(), 1.5);
    assert_eq!(e.eval::<i64>("tensor([7]).item()").unwrap(), 7);
    assert_eq!(e.eval::<f64>("tensor([[2.5]]).item()").unwrap(), 2.5);
    let s: String = e
        .eval("to_string(tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))")
        .unwrap();
    assert!(
        s.starts_with("Tensor[f32; 2x3]") && s.contains("mean="),
        "{s}"
    );
}

#[test]
fn arithmetic_broadcasts() {
    let e = engine();
    check(
        &e,
        "tensor([[1, 2, 3], [4, 5, 6]]) + tensor([10, 20, 30])",
        &[2, 3],
        "i64",
        &[11., 22., 33., 14., 25., 36.],
    );
    check(
        &e,
        "tensor([[1.0], [2.0]]) * tensor([1.0, 10.0, 100.0])",
        &[2, 3],
        "f32",
        &[1., 10., 100., 2., 20., 200.],
    );
    check(
        &e,
        "tensor([[1.0], [2.0]]) - tensor([1.0, 3.0])",
        &[2, 2],
        "f32",
        &[0., -2., 1., -1.],
    );
    check(
        &e,
        "tensor([[2.0, 4.0]]) / tensor([[2.0], [4.0]])",
        &[2, 2],
        "f32",
        &[1., 2., 0.5, 1.],
    );
    // int tensor with float tensor promotes to f32; int / int is true division.
    check(
        &e,
        "tensor([1, 2]) + tensor([0.5, 0.5])",
        &[2],
        "f32",
        &[1.5, 2.5],
    );
    check(
        &e,
        "tensor([1, 3]) / tensor([2, 2])",
        &[2],
        "f32",
        &[0.5, 1.5],
    );
}

#[test]
fn scalar_operators_on_both_sides() {
    let e = engine();
    let t = "tensor([1.0, 2.0, 4.0])";
    check(&e, &format!("2 * {t}"), &[3], "f32", &[2., 4., 8.]);
    check(&e, &format!("{t} * 2"), &[3], "f32", &[2., 4., 8.]);
    check(&e, &format!("{t} / 2"), &[3], "f32", &[0.5, 1., 2.]);
    check(&e, &format!("8 / {t}"), &[3], "f32", &[8., 4., 2.]);
    check(&e, &format!("1.5 - {t}"), &[3], "f32", &[0.5, -0.5, -2.5]);
    check(&e, &format!("{t} - 1.5"), &[3], "f32", &[-0.5, 0.5, 2.5]);
    check(&e, &format!("0.5 + {t}"), &[3], "f32", &[1.5, 2.5, 4.5]);
    check(&e, &format!("{t} + 1"), &[3], "f32", &[2., 3., 5.]);
    check(&e, &format!("-{t}"), &[3], "f32", &[-1., -2., -4.]);
    check(&e, &format!("{t} ** 2"), &[3], "f32", &[1., 4., 16.]);
    // Integer tensors: int scalars keep i64, float scalars promote to f32, `/` is true division.
    let i = "tensor([1, 2, 3])";
    check(&e, &format!("{i} * 2"), &[3], "i64", &[2., 4., 6.]);
    check(&e, &format!("3 - {i}"), &[3], "i64", &[2., 1., 0.]);
    check(&e, &format!("{i} + 0.5"), &[3], "f32", &[1.5, 2.5, 3.5]);
    check(&e, &format!("0.5 * {i}"), &[3], "f32", &[0.5, 1., 1.5]);
    check(&e, &format!("{i} / 2"), &[3], "f32", &[0.5, 1., 1.5]);
    check(&e, &format!("3 / {i}"), &[3], "f32", &[3., 1.5, 1.]);
}

#[test]
fn elementwise_and_reductions() {
    let e = engine();
    let x = "tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])";
    check(
        &e,
        &format!("{x}.exp()"),
        &[2, 3],
        "f32",
        &[
            1.,
            1f64.exp(),
            2f64.exp(),
            3f64.exp(),
            (-1f64).exp(),
            0.5f64.exp(),
        ],
    );
    check(
        &e,
        "tensor([1.0, 4.0]).log()",
        &[2],
        "f32",
        &[0., 4f64.ln()],
    );
    check(&e, "tensor([4, 9]).sqrt()", &[2], "f32", &[2., 3.]);
    check(
        &e,
        "tensor([0.0, 2.0]).sigmoid()",
        &[2],
        "f32",
        &[0.5, 1. / (1. + (-2f64).exp())],
    );
    let z = 1f64.exp() + 2f64.exp() + 3f64.exp();
    check(
        &e,
        "tensor([[1.0, 2.0, 3.0]]).softmax(1)",
        &[1, 3],
        "f32",
        &[1f64.exp() / z, 2f64.exp() / z, 3f64.exp() / z],
    );
    check(
        &e,
        "tensor([[1.0, 2.0], [1.0, 4.0]]).softmax(0)",
        &[2, 2],
        "f32",
        &[
            0.5,
            1. / (1. + 2f64.exp()),
            0.5,
            2f64.exp() / (1. + 2f64.exp()),
        ],
    );
    check(
        &e,
        "tensor([[1.0, 2.0, 3.0]]).softmax(-1).sum()",
        &[],
        "f32",
        &[1.],
    );
    check(
        &e,
        &format!("{x}.clamp(0, 1.5)"),
        &[2, 3],
        "f32",
        &[0., 1., 1.5, 1.5, 0., 0.5],
    );
    check(&e, &format!("{x}.sum()"), &[], "f32", &[5.5]);
    check(&e, &format!("{x}.mean()"), &[], "f32", &[5.5 / 6.]);
    check(&e, &format!("{x}.sum(0)"), &[3], "f32", &[3., 0., 2.5]);
    check(&e, &format!("{x}.sum(-1)"), &[2], "f32", &[3., 2.5]);
    check(&e, &format!("{x}.mean(1)"), &[2], "f32", &[1., 2.5 / 3.]);
    check(&e, &format!("{x}.argmax(1)"), &[2], "i64", &[2., 0.]);
    check(&e, &format!("{x}.argmax(0)"), &[3], "i64", &[1., 0., 0.]);
    check(&e, "tensor([1, 2, 3, 4]).mean()", &[], "f32", &[2.5]);
}

#[test]
fn shape_ops() {
    let e = engine();
    let x = "arange(0, 6)";
    check(
        &e,
        &format!("{x}.reshape([2, 3])"),
        &[2, 3],
        "f32",
        &[0., 1., 2., 3., 4., 5.],
    );
    check(
        &e,
        &format!("{x}.reshape([-1, 2])"),
        &[3, 2],
        "f32",
        &[0., 1., 2., 3., 4., 5.],
    );
    check(
        &e,
        &format!("{x}.reshape([2, 3]).transpose(0, 1)"),
        &[3, 2],
        "f32",
        &[0., 3., 1., 4., 2., 5.],
    );
    check(
        &e,
        &format!("{x}.reshape([2, 3]).transpose(-1, 0)"),
        &[3, 2],
        "f32",
        &[0., 3., 1., 4., 2., 5.],
    );
    check(
        &e,
        &format!("{x}.reshape([2, 3]).narrow(1, 1, 2)"),
        &[2, 2],
        "f32",
        &[1., 2., 4., 5.],
    );
    check(&e, &format!("{x}.narrow(0, 4, 2)"), &[2], "f32", &[4., 5.]);
    check(
        &e,
        "cat([tensor([[1, 2]]), tensor([[3, 4], [5, 6]])], 0)",
        &[3, 2],
        "i64",
        &[1., 2., 3., 4., 5., 6.],
    );
    check(
        &e,
        "cat([tensor([[1.0], [2.0]]), tensor([[3.0], [4.0]])], 1)",
        &[2, 2],
        "f32",
        &[1., 3., 2., 4.],
    );
    check(
        &e,
        "stack([tensor([1.0, 2.0]), tensor([3.0, 4.0])], 0)",
        &[2, 2],
        "f32",
        &[1., 2., 3., 4.],
    );
    check(
        &e,
        "stack([tensor([1.0, 2.0]), tensor([3.0, 4.0])], 1)",
        &[2, 2],
        "f32",
        &[1., 3., 2., 4.],
    );
    check(
        &e,
        "stack([tensor([1, 2]), tensor([0.5, 4.0])], -1)",
        &[2, 2],
        "f32",
        &[1., 0.5, 2., 4.],
    );
}

/// Expected values below are what PyTorch returns (worked out by hand from its definitions).
#[test]
fn sort_gather_index_select_match_pytorch() {
    let e = engine();
    let t = "tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])";
    // torch.sort(t, dim=1, descending=True)
    check(
        &e,
        &format!("{t}.sort(1, true).values"),
        &[2, 3],
        "f32",
        &[3., 2., 1., 5., 4., 0.],
    );
    check(
        &e,
        &format!("{t}.sort(1, true).indices"),
        &[2, 3],
        "i64",
        &[0., 2., 1., 1., 2., 0.],
    );
    // torch.sort(t, dim=0) ascending
    check(
        &e,
        &format!("{t}.sort(0, false).values"),
        &[2, 3],
        "f32",
        &[0., 1., 2., 3., 5., 4.],
    );
    check(
        &e,
        &format!("{t}.sort(0, false).indices"),
        &[2, 3],
        "i64",
        &[1., 0., 0., 0., 1., 1.],
    );
    check(
        &e,
        &format!("{t}.sort(-1, false).indices"),
        &[2, 3],
        "i64",
        &[1., 2., 0., 0., 2., 1.],
    );
    // 3-D, middle dim: values of each [:, :, k] column sorted.
    check(
        &e,
        "tensor([[[1, 9], [3, 7], [2, 8]]]).sort(1, true).indices",
        &[1, 3, 2],
        "i64",
        &[1., 0., 2., 2., 0., 1.],
    );
    // torch.gather: out[i][j] = t[i][idx[i][j]] (dim 1), = t[idx[i][j]][j] (dim 0).
    let g = "tensor([[1.0, 2.0], [3.0, 4.0]])";
    check(
        &e,
        &format!("{g}.gather(1, tensor([[0, 0], [1, 0]]))"),
        &[2, 2],
        "f32",
        &[1., 1., 4., 3.],
    );
    check(
        &e,
        &format!("{g}.gather(0, tensor([[1, 0]]))"),
        &[1, 2],
        "f32",
        &[3., 2.],
    );
    check(
        &e,
        &format!("{g}.gather(1, tensor([[1], [0]]))"),
        &[2, 1],
        "f32",
        &[2., 3.],
    );
    // Along the gather dim the index may be longer than the input (torch allows it).
    check(
        &e,
        &format!("{g}.gather(0, tensor([[1, 0], [0, 1], [1, 1]]))"),
        &[3, 2],
        "f32",
        &[3., 2., 1., 4., 3., 4.],
    );
    // Index smaller than the input in a non-gather dim (torch allows it).
    check(
        &e,
        "tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]).gather(1, tensor([[2, 0]]))",
        &[1, 2],
        "i64",
        &[3., 1.],
    );
    // torch.index_select
    let s = "tensor([[1, 2], [3, 4], [5, 6]])";
    check(
        &e,
        &format!("{s}.index_select(0, tensor([2, 0]))"),
        &[2, 2],
        "i64",
        &[5., 6., 1., 2.],
    );
    check(
        &e,
        &format!("{s}.index_select(1, tensor([1, 1, 0]))"),
        &[3, 3],
        "i64",
        &[2., 2., 1., 4., 4., 3., 6., 6., 5.],
    );
    check(
        &e,
        &format!("{s}.index_select(-2, tensor([1]))"),
        &[1, 2],
        "i64",
        &[3., 4.],
    );
}

#[test]
fn rng_is_deterministic_and_seeded_by_the_run() {
    let e = engine();
    let same: bool = e
        .eval("max_abs_diff(rng(5).randn([4, 3]), rng(5).randn([4, 3])) == 0.0")
        .unwrap();
    assert!(same);
    let differ: f64 = e
        .eval("max_abs_diff(rng(5).randn([4, 3]), rng(6).randn([4, 3]))")
        .unwrap();
    assert!(differ > 0.1, "{differ}");
    // Draws advance one stream: a second draw differs from the first.
    let advance: f64 = e
        .eval("let r = rng(1); max_abs_diff(r.rand([8]), r.rand([8]))")
        .unwrap();
    assert!(advance > 0.0);
    // The same script in two engines gives the same numbers.
    let a = eval_t(&e, "let r = rng(3); r.randn([2]); r.randint(0, 10, [6])");
    let b = eval_t(
        &engine(),
        "let r = rng(3); r.randn([2]); r.randint(0, 10, [6])",
    );
    assert_eq!(a, b);
    assert_eq!(a.1, "i64");
    assert!(a
        .2
        .iter()
        .all(|&v| (0.0..10.0).contains(&v) && v.fract() == 0.0));
    let u = eval_t(&e, "rng(9).rand([1000])");
    assert!(u.2.iter().all(|&v| (0.0..1.0).contains(&v)));
    let m = u.2.iter().sum::<f64>() / 1000.0;
    assert!((m - 0.5).abs() < 0.05, "{m}");
    // rng() without a seed uses --seed (the host's seed).
    let seeded = engine_with_seed(42);
    assert_eq!(
        eval_t(&seeded, "rng().randn([5])"),
        eval_t(&seeded, "rng(42).randn([5])")
    );
    assert_ne!(
        eval_t(&seeded, "rng().randn([5])"),
        eval_t(&engine_with_seed(43), "rng().randn([5])")
    );
}

#[test]
fn safetensors_round_trip_through_the_script_api() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors").display().to_string();
    let e = engine();
    let script = format!(
        r#"
        let a = rng(2).randn([3, 4]);
        let ids = tensor([[1, 2, 3]]);
        save_safetensors(#{{a: a, ids: ids, h: a.to_dtype("f16")}}, "{path}");
        let m = load_safetensors("{path}");
        [max_abs_diff(m.a, a), m.ids.dtype, m.ids.to_array(), m.h.dtype, m.a.shape, m.keys().len()]
    "#
    );
    let out: rhai::Array = e.eval(&script).unwrap();
    assert_eq!(out[0].as_float().unwrap(), 0.0);
    assert_eq!(out[1].clone().into_string().unwrap(), "i64");
    assert_eq!(format!("{:?}", out[2]), "[[1, 2, 3]]");
    assert_eq!(out[3].clone().into_string().unwrap(), "f16");
    assert_eq!(format!("{:?}", out[4]), "[3, 4]");
    assert_eq!(out[5].as_int().unwrap(), 3);
    let err = e
        .eval::<Dynamic>(r#"save_safetensors(#{a: 1}, "x.safetensors")"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`a`") && err.contains("not a tensor"), "{err}");
}

fn err_of(e: &Engine, script: &str) -> Box<EvalAltResult> {
    e.eval::<Dynamic>(script).expect_err(script)
}

#[test]
fn runtime_errors_carry_line_and_column() {
    let e = engine();
    let err = err_of(
        &e,
        "let a = zeros([2]);\nlet b = zeros([3]);\nlet c = 1;\nlet d =   a + b;",
    );
    assert_eq!(
        (err.position().line(), err.position().position()),
        (Some(4), Some(13)),
        "{err}"
    );
    let err = err_of(&e, "let t = ones([2, 3]);\n  t.reshape([4, 4])");
    assert_eq!(err.position().line(), Some(2), "{err}");
    assert!(err.to_string().contains("reshape"), "{err}");
}

/// Line and column (1-based) of the first occurrence of `needle` in `text`.
fn locate(text: &str, needle: &str) -> (usize, usize) {
    for (i, line) in text.lines().enumerate() {
        if let Some(c) = line.find(needle) {
            return (i + 1, c + 1);
        }
    }
    panic!("`{needle}` not found");
}

#[test]
fn errors_inside_stdlib_modules_name_the_module_file_and_line() {
    // Tests run in the package root, where `stdlib/` is.
    let util = std::fs::read_to_string("stdlib/util.rhai").unwrap();
    let e = engine();
    let main = "let a = zeros([2]);\nlet b = ones([2]);\nimport \"util\" as u;\nu::check_close(a, b, 0.0);";

    // A `throw` inside the module.
    let err = err_of(&e, main);
    let report = lpo::run::report::format_eval_error("main.rhai", main, &err);
    let (line, _) = locate(&util, "throw `tensors differ");
    assert!(
        report.contains(&format!("stdlib/util.rhai:{line}:")),
        "{report}"
    );
    assert!(report.contains("tensors differ"), "{report}");
    assert!(
        report.contains("main.rhai:4:"),
        "the call site is named: {report}"
    );

    // A host call with wrong shapes inside a module function.
    let main2 =
        "import \"util\" as u;\nlet a = zeros([2]);\n\n  u::check_close(a, zeros([3]), 0.0);";
    let err = err_of(&e, main2);
    let report = lpo::run::report::format_eval_error("main.rhai", main2, &err);
    let (line, col) = locate(&util, "max_abs_diff(a, b)");
    assert!(
        report.contains(&format!("stdlib/util.rhai:{line}:{col}")),
        "{report}"
    );
    assert!(report.contains("shapes differ"), "{report}");
    assert!(report.contains("main.rhai:4:"), "{report}");

    // A namespaced call of a module function that fails at the host level keeps its line.
    let main3 = "import \"util\" as u;\n\nlet x = u::mean_of(\"abc\");";
    let err = err_of(&e, main3);
    let report = lpo::run::report::format_eval_error("main.rhai", main3, &err);
    assert!(report.contains("main.rhai:3:"), "{report}");
}

/// Every script must fail with a clear error and never panic.
#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors").display().to_string();
    let cases: Vec<(String, &[&str])> = vec![
        ("tensor([1, 2]) + tensor([1, 2, 3])".into(), &["[2]", "[3]"]),
        (
            "ones([2, 3]).matmul(ones([2, 3]))".into(),
            &["matmul", "[2, 3]"],
        ),
        (
            "max_abs_diff(zeros([2]), zeros([3]))".into(),
            &["shapes differ"],
        ),
        ("tensor([[1, 2], [3]])".into(), &["ragged"]),
        ("tensor([[1, 2], 3])".into(), &["ragged"]),
        ("tensor([1, \"a\"])".into(), &["not a number"]),
        ("zeros([2, -1])".into(), &["negative"]),
        ("ones([-3])".into(), &["negative"]),
        ("zeros([2, 1.5])".into(), &["not an int"]),
        ("arange(0, 6).reshape([4, 2])".into(), &["reshape"]),
        ("arange(0, 6).reshape([-1, -1])".into(), &["reshape"]),
        ("arange(0, 6).reshape([4, -1])".into(), &["reshape"]),
        ("arange(0, 6).reshape([-2, 3])".into(), &["reshape"]),
        ("arange(0, 6).reshape([0, -1])".into(), &["reshape"]),
        ("arange(0, 6).narrow(0, 4, 5)".into(), &["narrow"]),
        ("arange(0, 6).narrow(0, -1, 2)".into(), &["narrow"]),
        ("arange(0, 6).sum(3)".into(), &["dim 3"]),
        ("arange(0, 6).softmax(-2)".into(), &["dim -2"]),
        ("arange(0, 6).transpose(0, 1)".into(), &["dim 1"]),
        ("arange(0, 6).sort(2, true)".into(), &["dim 2"]),
        (
            "arange(0, 4).index_select(0, tensor([[0, 1]]))".into(),
            &["1-D"],
        ),
        (
            "arange(0, 4).index_select(0, tensor([7]))".into(),
            &["index"],
        ),
        (
            "arange(0, 4).index_select(0, tensor([-1]))".into(),
            &["index"],
        ),
        ("ones([2, 2]).gather(1, tensor([0, 1]))".into(), &["rank"]),
        (
            "ones([2, 2]).gather(1, tensor([[0, 5], [1, 0]]))".into(),
            &["index"],
        ),
        (
            "ones([2, 2]).gather(1, tensor([[0], [-1]]))".into(),
            &["index"],
        ),
        (
            "ones([2, 2]).gather(0, tensor([[0, 0, 0]]))".into(),
            &["gather"],
        ),
        ("ones([2]).clamp(1, 0)".into(), &["clamp"]),
        (
            "arange(0, 4).index_select(0, tensor([0.5]))".into(),
            &["index", "f32"],
        ),
        (
            "ones([2, 2]).gather(1, tensor([[0.0], [1.0]]))".into(),
            &["index", "f32"],
        ),
        (
            "tensor([[1, 2]]).matmul(tensor([[1.0], [2.0]]))".into(),
            &["matmul", "i64", "f32"],
        ),
        ("tensor([1, 2]).item()".into(), &["item"]),
        ("arange(0, 3)[5]".into(), &["out of range"]),
        ("cat([], 0)".into(), &["at least one"]),
        ("cat([zeros([2]), zeros([2, 1])], 0)".into(), &["cat"]),
        ("stack([zeros([2]), zeros([3])], 0)".into(), &["stack"]),
        ("stack([zeros([2])], 5)".into(), &["dim 5"]),
        ("zeros([2]).to_dtype(\"f17\")".into(), &["f17"]),
        ("zeros([2]).to_device(\"tpu\")".into(), &["tpu"]),
        ("rng(0).randint(5, 2, [3])".into(), &["empty range"]),
        ("rng(0).randn([2, -2])".into(), &["negative"]),
        (
            format!("load_safetensors(\"{missing}\")"),
            &["missing.safetensors"],
        ),
        (
            "adamw(params_from(#{w: [1.0]}), #{beta: 1, bta: 2})".into(),
            &["`bta`", "accepted:"],
        ),
    ];
    let e = engine();
    let mut failures = Vec::new();
    for (script, needles) in &cases {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.eval::<Dynamic>(script)));
        match outcome {
            Err(_) => failures.push(format!("PANIC: {script}")),
            Ok(Ok(v)) => failures.push(format!("no error: {script} -> {v}")),
            Ok(Err(err)) => {
                let msg = err.to_string();
                if let Some(n) = needles.iter().find(|n| !msg.contains(**n)) {
                    failures.push(format!("{script}: `{n}` not in: {msg}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
