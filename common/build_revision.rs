// The build script of both binaries (their build.rs include it): bakes the git revision and the
// compiler version into the binary, for `--version` and `telemeter_{client,server}_build_info`:
// `TELEMETER_REVISION` (`unknown` when built without git, e.g. from a source tarball) and
// `TELEMETER_RUSTC`.

use std::process::Command;

fn main() {
    let run = |program: &str, args: &[&str]| -> Option<String> {
        let out = Command::new(program).args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let revision =
        run("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = run(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TELEMETER_REVISION={revision}");
    println!("cargo:rustc-env=TELEMETER_RUSTC={rustc}");
    // Built again when HEAD moves (a commit, a checkout); paths as git gives them, which also
    // works in a worktree, whose .git is a file.
    for path in ["HEAD", "refs/heads", "packed-refs"] {
        if let Some(path) = run("git", &["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../common/build_revision.rs");
}
