//! Running external commands in tests.

use std::borrow::BorrowMut;
use std::process::{Command, Output};

/// Shell-like rendering of a command line (program, args; env overrides first).
pub fn command_line(cmd: &Command) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            parts.push(format!(
                "{}={}",
                k.to_string_lossy(),
                quote(&v.to_string_lossy())
            ));
        }
    }
    parts.push(quote(&cmd.get_program().to_string_lossy()));
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    let line = parts.join(" ");
    match cmd.get_current_dir() {
        Some(d) => format!("(cd {} && {line})", quote(&d.to_string_lossy())),
        None => line,
    }
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn report(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        command_line(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run `cmd` (stdin: null), capture stdout/stderr, and return the output. Panics if it
/// cannot be started (never on its exit status).
#[track_caller]
pub fn try_run(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    cmd.stdin(std::process::Stdio::null());
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run {}: {e}", command_line(cmd)),
    }
}

/// Run `cmd`, capture its output, and panic with the full command line, exit status,
/// stdout and stderr unless it exits 0.
#[track_caller]
pub fn run(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    let out = try_run(&mut *cmd);
    if !out.status.success() {
        panic!("command failed\n{}", report(cmd, &out));
    }
    out
}

/// [`run`] and return stdout as a (lossy) string.
#[track_caller]
pub fn run_stdout(cmd: impl BorrowMut<Command>) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// Run `cmd` and panic (with full output) unless it exits non-zero; returns the output.
#[track_caller]
pub fn run_fail(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    let out = try_run(&mut *cmd);
    if out.status.success() {
        panic!("command unexpectedly succeeded\n{}", report(cmd, &out));
    }
    out
}
