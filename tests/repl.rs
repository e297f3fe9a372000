//! `lpo repl` driven through a pseudo-terminal: persistent variables, functions and imports,
//! multi-line input, tab completion, `:help`, tensor display, errors with a caret, history, and
//! Ctrl-C cancelling a long loop without ending the session.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use expectrl::Session;

fn repl(home: &Path) -> Session {
    repl_with(home, &[])
}

fn repl_with(home: &Path, extra: &[&str]) -> Session {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lpo"));
    cmd.args(["repl", "--seed", "7"])
        .args(extra)
        .current_dir(home)
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("TERM", "xterm")
        .env("LPO_LOG", "warn");
    let mut s = Session::spawn(cmd).expect("spawn lpo repl in a pty");
    s.set_expect_timeout(Some(Duration::from_secs(20)));
    s.expect("lpo> ").expect("first prompt");
    s
}

fn eval(s: &mut Session, line: &str, want: &str) {
    s.send_line(line).unwrap();
    if let Err(e) = s.expect(want) {
        panic!("after `{line}` expected `{want}`: {e}");
    }
    if want == "lpo> " {
        return;
    }
    s.expect("lpo> ")
        .unwrap_or_else(|e| panic!("no prompt after `{line}`: {e}"));
}

#[test]
fn session_state_multiline_completion_help_and_errors() {
    let home = tempfile::tempdir().unwrap();
    let mut s = repl(home.path());
    eval(&mut s, "let x = 20;", "lpo> ");
    eval(&mut s, "import \"util\" as u;", "lpo> ");
    // A line with output marks the prompt after it as fresh: "lpo> " alone can match the
    // editor's redraw of the line just typed, and input sent then raced the evaluation.
    eval(&mut s, "\"ready\" + \"-1\"", "ready-1");
    // An unfinished definition continues on the next lines. Each is sent once the editor echoed
    // the previous one: input that arrived with the final Enter was lost (a flaky timeout).
    for (line, echo) in [
        ("fn twice(v) {", "twice(v) {"),
        ("  v * 2", "v * 2"),
        ("}", "}"),
    ] {
        s.send_line(line).unwrap();
        s.expect(echo)
            .unwrap_or_else(|e| panic!("no echo of `{line}`: {e}"));
    }
    eval(&mut s, "\"def\" + \"-ok\"", "def-ok");
    eval(&mut s, "u::param(#{}, \"k\", 1) + twice(x) + 1000", "1041");
    // Tab completes a registered function name.
    s.send("default_se").unwrap();
    s.send("\t").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    eval(&mut s, "() + 1000", "1007");
    eval(&mut s, ":help checkpoint_save", "atomically");
    eval(&mut s, ":help", ":load FILE");
    eval(
        &mut s,
        "tensor([[1.0, 2.0], [3.0, 4.0]])",
        "Tensor[f32; 2x2] mean=2.5000",
    );
    eval(&mut s, "#{a: \"text\"}", "#{\"a\": \"text\"}");
    eval(
        &mut s,
        "let y = 1 + nope_fn(3)",
        "<repl>:1:13: Function not found",
    );
    eval(&mut s, ":vars", "x: i64 = 20");
    std::fs::write(
        home.path().join("lib.rhai"),
        "fn thrice(v) { v * 3 }\nlet z = 5;",
    )
    .unwrap();
    eval(&mut s, ":load lib.rhai", "lpo> ");
    eval(&mut s, "thrice(z) + 2000", "2015");
    eval(&mut s, ":time 1 + 3000", "time: ");
    eval(&mut s, ":reset", "session reset");
    eval(&mut s, "x", "Variable not found");
    s.send_line(":quit").unwrap();
    let status = std::ops::DerefMut::deref_mut(&mut s).wait().unwrap();
    assert!(
        matches!(status, expectrl::WaitStatus::Exited(_, 0)),
        "{status:?}"
    );
    let history = std::fs::read_to_string(home.path().join("data/lpo/history.txt")).unwrap();
    assert!(history.contains("let x = 20;"), "{history}");
}

#[test]
fn ctrl_c_cancels_a_running_loop_and_keeps_the_session() {
    let home = tempfile::tempdir().unwrap();
    let mut s = repl(home.path());
    eval(&mut s, "let n = 0;", "lpo> ");
    s.send_line("loop { n += 1; }").unwrap();
    std::thread::sleep(Duration::from_millis(400));
    s.send_control('c').unwrap();
    s.expect("interrupted").unwrap();
    s.expect("lpo> ").unwrap();
    eval(&mut s, "if n > 0 { \"counted\" + \"-ok\" }", "counted-ok");
    // Ctrl-C at the prompt clears the line.
    s.send("let partial = 1").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.send_control('c').unwrap();
    s.expect("lpo> ").unwrap();
    eval(&mut s, "1000 + 234", "1234");
    s.send_control('d').unwrap();
    let status = std::ops::DerefMut::deref_mut(&mut s).wait().unwrap();
    assert!(
        matches!(status, expectrl::WaitStatus::Exited(_, 0)),
        "{status:?}"
    );
}

#[test]
fn the_repl_is_unconfined_unless_given_allow_flags() {
    let home = tempfile::tempdir().unwrap();
    let mut s = repl(home.path());
    eval(&mut s, "read_prompts(\"/etc/passwd\").len() > 0", "true");
    s.send_line(":quit").unwrap();

    std::fs::create_dir(home.path().join("out")).unwrap();
    let mut s = repl_with(home.path(), &["--allow-write", "out"]);
    eval(&mut s, "read_prompts(\"/etc/passwd\")", "--allow-read DIR");
    eval(
        &mut s,
        "write_json(#{a: 1}, \"elsewhere.json\")",
        "--allow-write DIR",
    );
    eval(
        &mut s,
        "write_json(#{a: 1}, \"out/x.json\"); \"written\" + \"-ok\"",
        "written-ok",
    );
    s.send_line(":quit").unwrap();
    assert!(home.path().join("out/x.json").is_file());
    assert!(!home.path().join("elsewhere.json").exists());
}
