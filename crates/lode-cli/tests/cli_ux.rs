//! What an operator sees: progress bars only on a terminal (never in a pipe, not with
//! `--quiet` or `LODE_PROGRESS=0`), the manual in `--help` and `lode __man`, JSON for scripts,
//! and one-line errors that name the image, blob or file and the cause.

use std::path::Path;
use std::process::{Command, Output};

use lode_registry::testing::TestRegistry;
use lode_testkit::cmd::{command_line, run, run_fail, run_stdout, try_run};
use lode_testkit::oci::{skopeo_push, tar_gz, write_layout};
use lode_testkit::tree::{materialize, sample_tree, TreeParams};

fn lode() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lode"));
    // Whatever the environment of the test run says, these tests decide.
    cmd.env_remove("LODE_PROGRESS");
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Terminal control: escape sequences, or carriage returns redrawing a line.
fn assert_plain(what: &str, bytes: &[u8]) {
    assert!(
        !bytes.contains(&0x1b) && !bytes.contains(&b'\r'),
        "{what} has terminal control characters: {:?}",
        text(bytes)
    );
}

/// `cmd` run under a pseudo-terminal (util-linux `script`): everything it wrote to the
/// terminal, stdout and stderr together.
fn on_tty(cmd: &Command) -> String {
    let out = run(Command::new("script")
        .args(["-qfec", &command_line(cmd), "/dev/null"])
        .env("TERM", "xterm"));
    text(&out.stdout)
}

/// A small source tree with enough data for several progress updates.
fn source(w: &Path) -> std::path::PathBuf {
    let src = w.join("src");
    std::fs::create_dir(&src).unwrap();
    materialize(&sample_tree(TreeParams::default(), 5), &src).unwrap();
    let big: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("big.bin"), big).unwrap();
    src
}

fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lode-ux-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// The lines a build prints on stdout, whether or not stderr is a terminal.
fn assert_build_report(stdout: &str) {
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 2, "{stdout}");
    assert!(lines[0].starts_with("built "), "{stdout}");
    assert!(lines[1].starts_with("bootstrap "), "{stdout}");
}

#[test]
fn help_reads_as_a_manual() {
    let long = run_stdout(lode().arg("--help"));
    for section in ["EXAMPLES:", "ENVIRONMENT:", "FILES:", "EXIT STATUS:"] {
        assert!(
            long.contains(section),
            "lode --help lacks {section}:\n{long}"
        );
    }
    for word in [
        "RUST_LOG",
        "LODE_RUN_DIR",
        "LODE_REGISTRY_AUTH",
        "LODE_CACHE_MAX_SIZE",
        "LODE_PROGRESS",
        "/var/lib/lode/cache",
        "/run/lode",
        "lode convert",
        "lode umount",
    ] {
        assert!(long.contains(word), "lode --help lacks {word}:\n{long}");
    }
    // -h stays a summary.
    let short = run_stdout(lode().arg("-h"));
    assert!(!short.contains("ENVIRONMENT:"), "{short}");
    assert!(short.lines().count() < long.lines().count() / 2);
    for sub in [
        "build", "convert", "push", "pull", "mount", "umount", "cache", "inspect", "ls", "cat",
        "unpack",
    ] {
        let help = run_stdout(lode().args([sub, "--help"]));
        assert!(
            help.contains("EXAMPLES:") && help.contains(&format!("lode {sub} ")),
            "lode {sub} --help has no example:\n{help}"
        );
    }
}

#[test]
fn man_pages_are_rendered() {
    let w = workdir();
    let dir = w.path().join("man");
    run(lode().arg("__man").arg(&dir));
    let page = std::fs::read_to_string(dir.join("lode.1")).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH lode"),
        "{page}"
    );
    assert!(page.contains("ENVIRONMENT") && page.contains("EXAMPLES"));
    let build = std::fs::read_to_string(dir.join("lode-build.1")).unwrap();
    assert!(build.contains("lode\\-build") && build.contains("chunk"));
    assert!(
        !dir.join("lode-__fuse-worker.1").exists(),
        "hidden commands get no page"
    );
    let stdout = run_stdout(lode().arg("__man"));
    assert_eq!(stdout, page);
}

#[test]
fn build_draws_progress_only_on_a_terminal() {
    let work = workdir();
    let w = work.path();
    let src = source(w);
    tar_gz::<&str>(&src, &[], &w.join("layer.tar.gz"));

    // Piped: the report and nothing else, for a directory and for a layer.
    let out = run(lode().arg("build").arg(&src).arg("-o").arg(w.join("a")));
    assert_plain("stderr of build", &out.stderr);
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    assert_build_report(&text(&out.stdout));
    let out = run(lode()
        .arg("build")
        .arg(w.join("layer.tar.gz"))
        .arg("-o")
        .arg(w.join("b")));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    assert_build_report(&text(&out.stdout));
    assert_plain("stdout of build", &out.stdout);
    let json = run_stdout(
        lode()
            .arg("build")
            .arg(&src)
            .arg("-o")
            .arg(w.join("c"))
            .arg("--json"),
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["input_bytes"].as_u64().unwrap() >= 24 << 20);

    // On a terminal: bars, then the same report.
    let mut cmd = lode();
    cmd.arg("build").arg(&src).arg("-o").arg(w.join("d"));
    let tty = on_tty(&cmd);
    assert!(tty.contains('\x1b') && tty.contains("building"), "{tty:?}");
    assert_build_report(&tty[tty.find("built ").expect("report")..]);
    let mut cmd = lode();
    cmd.arg("build")
        .arg(w.join("layer.tar.gz"))
        .arg("-o")
        .arg(w.join("e"));
    let tty = on_tty(&cmd);
    assert!(tty.contains("layer 1/1"), "{tty:?}");

    // ... unless asked not to.
    let mut cmd = lode();
    cmd.env("LODE_PROGRESS", "0")
        .arg("build")
        .arg(&src)
        .arg("-o")
        .arg(w.join("f"));
    assert!(!on_tty(&cmd).contains('\x1b'));
    let mut cmd = lode();
    cmd.args(["build", "-q"])
        .arg(&src)
        .arg("-o")
        .arg(w.join("g"));
    assert!(!on_tty(&cmd).contains('\x1b'));
    let mut cmd = lode();
    cmd.arg("--quiet")
        .arg("build")
        .arg(&src)
        .arg("-o")
        .arg(w.join("h"));
    assert!(!on_tty(&cmd).contains('\x1b'));
}

#[test]
fn registry_commands_draw_progress_only_on_a_terminal() {
    let work = workdir();
    let w = work.path();
    let src = source(w);
    run(lode().arg("build").arg(&src).arg("-o").arg(w.join("img")));
    let registry = TestRegistry::start();
    let dst = format!("{}/ux/app:v1", registry.addr());

    let out = run(lode()
        .args(["push", "--plain-http"])
        .arg(w.join("img"))
        .arg(&dst));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("pushed "));
    let out = run(lode()
        .args(["pull", "--all", "--plain-http", &dst])
        .arg(w.join("pulled")));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("pulled "));
    assert_plain("stdout of pull", &out.stdout);

    let mut cmd = lode();
    cmd.args(["push", "--plain-http"])
        .arg(w.join("img"))
        .arg(format!("{}/ux/other:v1", registry.addr()));
    let tty = on_tty(&cmd);
    assert!(tty.contains("pushing") && tty.contains('\x1b'), "{tty:?}");
    assert!(tty.contains("pushed "), "{tty:?}");
    let mut cmd = lode();
    cmd.args(["pull", "--all", "--plain-http", &dst])
        .arg(w.join("pulled2"));
    let tty = on_tty(&cmd);
    assert!(
        tty.contains("pulling") && tty.contains("pulled "),
        "{tty:?}"
    );

    // convert: per-layer download bars, then the upload; none in a pipe.
    tar_gz::<&str>(&src, &[], &w.join("l1.tar.gz"));
    write_layout(&w.join("layout"), "1", &[w.join("l1.tar.gz")]);
    let plain = format!("{}/ux/plain:1", registry.addr());
    skopeo_push(&w.join("layout"), "1", &plain);
    let out = run(lode().args([
        "convert",
        "--plain-http",
        &plain,
        &format!("{}/ux/conv:1", registry.addr()),
    ]));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("\nconverted ") && stdout.contains("\npushed "),
        "{stdout}"
    );
    let mut cmd = lode();
    cmd.args([
        "convert",
        "--plain-http",
        &plain,
        &format!("{}/ux/conv:2", registry.addr()),
    ]);
    let tty = on_tty(&cmd);
    assert!(
        tty.contains("layer 1/1") && tty.contains("sha256:"),
        "{tty:?}"
    );
    assert!(
        tty.contains("converted ") && tty.contains("pushed "),
        "{tty:?}"
    );
}

/// One line on stderr, `error: …`, containing each of `words`.
#[track_caller]
fn assert_error(out: &Output, words: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for w in words {
        assert!(err.contains(w), "error does not mention {w:?}: {err}");
    }
    assert_plain("an error", &out.stderr);
}

#[test]
fn errors_name_the_image_blob_and_cause() {
    let work = workdir();
    let w = work.path();
    let missing = w.join("no-such-dir");
    let m = missing.to_str().unwrap();
    let out = run_fail(lode().arg("build").arg(&missing).arg("-o").arg(w.join("x")));
    assert_error(&out, &[m, "No such file"]);

    let out = run_fail(
        lode()
            .args(["build", "--prefetch"])
            .arg(&missing)
            .arg(w.join("nothing"))
            .arg("-o")
            .arg(w.join("x")),
    );
    assert_error(&out, &["trace", m]);

    let not_image = w.join("plain-dir");
    std::fs::create_dir(&not_image).unwrap();
    let n = not_image.to_str().unwrap();
    assert_error(
        &run_fail(lode().arg("inspect").arg(&not_image)),
        &[n, "bootstrap"],
    );
    let out = run_fail(
        lode()
            .args(["push", "--plain-http"])
            .arg(&not_image)
            .arg("127.0.0.1:9/a:b"),
    );
    assert_error(&out, &[n, "image.json"]);

    let registry = TestRegistry::start();
    let unknown = format!("{}/ux/none:v9", registry.addr());
    let out = run_fail(
        lode()
            .args(["pull", "--plain-http", &unknown])
            .arg(w.join("p")),
    );
    assert_error(&out, &[&unknown, "not found"]);
    let out = run_fail(lode().args([
        "convert",
        "--plain-http",
        &unknown,
        &format!("{}/ux/dst:1", registry.addr()),
    ]));
    assert_error(&out, &[&unknown, "not found"]);

    // An image whose blob is missing: named by digest.
    let src = w.join("small");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), vec![1u8; 100_000]).unwrap();
    run(lode().arg("build").arg(&src).arg("-o").arg(w.join("img")));
    let blob = std::fs::read_dir(w.join("img/blobs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&blob).unwrap();
    let hex = blob.file_name().unwrap().to_str().unwrap();
    let out = run_fail(
        lode()
            .args(["push", "--plain-http"])
            .arg(w.join("img"))
            .arg(format!("{}/ux/broken:1", registry.addr())),
    );
    assert_error(&out, &[&hex[..12]]);
    let out = try_run(lode().arg("cat").arg(w.join("img")).arg("/f"));
    assert!(!out.status.success());
    assert_error(&out, &[&hex[..12]]);
}

#[test]
fn cache_commands_speak_json() {
    let work = workdir();
    let cache = work.path().join("cache");
    let ls = run_stdout(
        lode()
            .args(["cache", "ls", "--json", "--cache-dir"])
            .arg(&cache),
    );
    let v: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert!(v.as_array().is_some(), "{ls}");
    let gc = run_stdout(
        lode()
            .args(["cache", "gc", "--json", "--cache-dir"])
            .arg(&cache),
    );
    let v: serde_json::Value = serde_json::from_str(&gc).unwrap();
    assert_eq!(v["freed_bytes"], 0, "{gc}");
    assert!(v["removed"].as_array().is_some(), "{gc}");
}
