// Embeds every `stdlib/*.rhai` into the binary so `import "name"` works from any directory.
use std::{env, fs, path::Path};

fn main() {
    println!("cargo:rerun-if-changed=stdlib");
    let root = env::var("CARGO_MANIFEST_DIR").unwrap();
    let dir = Path::new(&root).join("stdlib");
    let mut entries: Vec<(String, String)> = Vec::new();
    if let Ok(read) = fs::read_dir(&dir) {
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "rhai") {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                println!("cargo:rerun-if-changed={}", path.display());
                entries.push((name, path.display().to_string()));
            }
        }
    }
    entries.sort();
    let mut code = String::from("/// Modules of `stdlib/` compiled into the binary: (name, source).\npub static EMBEDDED_STDLIB: &[(&str, &str)] = &[\n");
    for (name, path) in entries {
        code.push_str(&format!("    ({name:?}, include_str!({path:?})),\n"));
    }
    code.push_str("];\n");
    let out = Path::new(&env::var("OUT_DIR").unwrap()).join("embedded_stdlib.rs");
    fs::write(out, code).unwrap();
}
