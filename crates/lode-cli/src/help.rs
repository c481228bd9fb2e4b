//! The long help of `lode` and its subcommands, written as a manual page (`lode --help`,
//! `lode SUBCOMMAND --help`), and the hidden `lode __man [DIR]` that renders it as roff
//! (docs/man/ is made by it).
//!
//! The texts are put onto the command tree built by clap's derive, so each subcommand keeps
//! its one-line summary (shown by `-h`) next to its definition while the manual lives here.

use std::io::{self, Write};
use std::path::Path;

use clap::{Command, CommandFactory, FromArgMatches};

const LONG_ABOUT: &str = "\
lode runs a container image before the image is downloaded.

A lode image is an EROFS filesystem in two parts: a small metadata image, the bootstrap, that
the kernel mounts at once, and content-addressed data blobs of deduplicated chunks (zstd, lz4
or uncompressed) that are fetched when first read and kept in a local cache.

The workflow:
  1. `lode build` (a directory, OCI layer tarballs or an OCI image layout) or `lode convert`
     (an image already in a registry) makes an image directory: bootstrap, blobs/, image.json.
  2. `lode push` puts it into any OCI registry (`lode convert` pushes by itself).
  3. `lode mount` serves it from the registry, an http(s) URL or a directory; only what is
     read is downloaded. `lode pull` fetches the metadata (with --all, every blob).
  4. `lode status` (or `lode ls` without an image) shows the mounts and their counters;
     `lode umount` stops serving one; `lode cache ls` and `lode cache gc` look after the
     local blob cache.

`lode daemon` runs the node service that owns the mounts (HTTP API and Prometheus /metrics on
a unix socket); when it runs, `lode mount`, `umount`, `status` and `ls` go through it.

`lode inspect`, `ls`, `cat` and `unpack` read an image directory (or an EROFS image file made
by mkfs.erofs) without mounting it.";

const AFTER_LONG_HELP: &str = "\
EXAMPLES:
  Build an image from a directory and look inside it:
    lode build ./rootfs -o /srv/img/app
    lode inspect /srv/img/app
    lode ls /srv/img/app /etc

  Convert an image from a registry, then run it before it is downloaded:
    lode convert registry.example.com/library/debian:12 registry.example.com/debian:12-lode
    mkdir -p /mnt/debian && lode mount registry.example.com/debian:12-lode /mnt/debian
    chroot /mnt/debian cat /etc/os-release
    lode umount /mnt/debian

  Build from layer tarballs, push, and pull only the metadata elsewhere:
    lode build base.tar.gz app.tar.zst -o img
    lode push img 127.0.0.1:5000/app:v1 --plain-http
    lode pull 127.0.0.1:5000/app:v1 app --plain-http

  Scripting: reports are JSON with --json, progress bars never reach a pipe:
    lode build ./rootfs -o img --json | jq .deduplicated_bytes
    lode cache ls --json | jq '.[] | select(.in_use == false) | .digest'

ENVIRONMENT:
  LODE_REGISTRY_AUTH   USER:PASSWORD for the registry commands (as --creds).
  REGISTRY_AUTH_FILE, DOCKER_CONFIG, XDG_RUNTIME_DIR, HOME
                       Where registry credentials are looked up when neither --creds nor
                       --auth-file is given: $REGISTRY_AUTH_FILE, $DOCKER_CONFIG/config.json,
                       ~/.docker/config.json, $XDG_RUNTIME_DIR/containers/auth.json,
                       ~/.config/containers/auth.json.
  LODE_CACHE_MAX_SIZE  Most bytes the blob cache keeps on disk (e.g. 20G); unused blobs are
                       evicted least recently used first. Default: no limit.
  LODE_PROGRESS        0 turns progress bars off. Bars are drawn on stderr only when it is a
                       terminal (and not with --quiet or TERM=dumb).
  LODE_SOCKET          The `lode daemon` socket the mount commands use; default
                       /run/lode/lode.sock.
  LODE_RUN_DIR         Records (and fanotify logs) of served mounts; default /run/lode/mounts.
  LODE_FSCACHE_DIR     The fscache daemon's socket, state and log; default /run/lode/fscache.
  RUST_LOG             Log filter of the mount supervisors and workers, e.g. `info` or
                       `lode_storage=debug` (their logs: see FILES).
  LODE_LOG             Log filter of the fscache daemon.
  TMPDIR               Where `lode convert` builds when --output is not given.

FILES:
  /var/lib/lode/cache             The blob cache (--cache-dir): blobs/ (uncompressed data and
                                  state per blob), logs/fuse-*.log, fscache/ (cachefiles mode).
  /run/lode/lode.sock             The `lode daemon` API and /metrics (LODE_SOCKET).
  /run/lode/mounts                A record per served mount, used by `lode umount`; the
                                  fanotify supervisors' logs (<mount>.log).
  /run/lode/fscache               The fscache daemon: control.sock, images.json, daemon.log.
  IMG/bootstrap, IMG/image.json, IMG/blobs/<sha256>
                                  An image directory: metadata, manifest, data blobs.

EXIT STATUS:
  0 on success. 1 on failure, with one line `error: ...` on stderr that names the image, blob
  or file and the cause (the causes follow, separated by colons).";

/// (subcommand, long description, examples) for the subcommands that have them.
const SUBCOMMANDS: &[(&str, &str, &str)] = &[
    (
        "build",
        "\
Build an image directory (bootstrap, blobs/, image.json) from a directory tree, OCI layer
tarballs (applied in order, whiteouts included) or an OCI image layout.

File data is cut into --chunk-size chunks, hashed (blake3) and deduplicated; each chunk is
compressed on its own, so any range can be fetched and decompressed alone. Files up to
--inline-max bytes go into the bootstrap. With layers, each layer's new chunks form one blob.
The same input always gives the same bytes, whatever the thread count.

A progress bar (bytes read, files) is drawn on stderr when it is a terminal; the report on
stdout is the same either way.",
        "\
EXAMPLES:
  lode build ./rootfs -o img
  lode build base.tar.gz app.tar.zst -o img --compress lz4
  lode build --oci-layout ./layout:v1 -o img --chunk-dict old-img
  lode build ./rootfs -o img --prefetch boot.trace --json",
    ),
    (
        "convert",
        "\
Convert an OCI/Docker image in a registry into a lode image and push it.

The source's layers are downloaded one after another and imported while they stream in (a
manifest list resolves to this machine's platform); the lode image is built in --output (or a
temporary directory) and pushed to DESTINATION. Registry options apply to both registries.
Progress (per layer: bytes downloaded; then bytes uploaded) is drawn on stderr when it is a
terminal.",
        "\
EXAMPLES:
  lode convert docker.io/library/alpine:3.20 registry.example.com/alpine:3.20-lode
  lode convert 127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-lode --plain-http --output img
  lode convert src:tag dst:tag --chunk-dict previous-img --json",
    ),
    (
        "push",
        "\
Push an image directory to an OCI registry: the bootstrap and data blobs become the layers of
an OCI image manifest whose config is image.json. Blobs the registry has are not sent again.",
        "\
EXAMPLES:
  lode push img registry.example.com/app:v1
  LODE_REGISTRY_AUTH=me:secret lode push img 127.0.0.1:5000/app:v1 --plain-http",
    ),
    (
        "pull",
        "\
Pull a lode image from an OCI registry into an image directory: image.json and the bootstrap
(enough for `lode inspect`/`ls`, and for mounting with data fetched lazily), and with --all
every data blob. Everything is verified; files already present and intact are kept.",
        "\
EXAMPLES:
  lode pull registry.example.com/app:v1 app
  lode pull 127.0.0.1:5000/app:v1 app --all --plain-http",
    ),
    (
        "mount",
        "\
Mount an image. IMAGE is an image directory, an http(s) URL of one, or a registry reference.
With --mode auto (the default) lode picks the best lazy mode this machine supports and prints
it: fanotify (Linux 6.14+), else cachefiles on-demand, else FUSE. Lazy modes fetch data on
first read into --cache-dir; a small supervisor keeps the mount served until `lode umount`.",
        "\
EXAMPLES:
  lode mount registry.example.com/app:v1 /mnt/app
  lode mount img /mnt/app --mode local
  lode mount https://images.example.com/app /mnt/app --mode fuse
  lode mount 127.0.0.1:5000/app:v1 /mnt/app --plain-http --mode fanotify --prefetch-all",
    ),
    (
        "umount",
        "\
Unmount an image mounted by `lode mount`, then stop the process that served it.",
        "\
EXAMPLES:
  lode umount /mnt/app",
    ),
    (
        "status",
        "\
Show the mounts of this machine with their mode, image, state and counters (bytes fetched,
requests, …), from the `lode daemon` when one runs, else from the mount records.",
        "\
EXAMPLES:
  lode status
  lode status /mnt/app --json",
    ),
    (
        "daemon",
        "\
Run the node service: it owns every mount (any mode), restarts their workers, and serves an
HTTP API and Prometheus /metrics on a unix socket (0600). Configuration: a TOML file
(docs/lode.toml); --socket and --cache-dir override it. Logs go to stderr (RUST_LOG).",
        "\
EXAMPLES:
  lode daemon --config /etc/lode/lode.toml
  curl --unix-socket /run/lode/lode.sock http://lode/metrics",
    ),
    (
        "cache",
        "\
Inspect or clean the local blob cache (default /var/lib/lode/cache). `ls` lists each cached
blob: its size, bytes on disk, chunks held, when it was last used and whether a mount uses it.
`gc` removes blobs no mount uses, least recently used first.",
        "\
EXAMPLES:
  lode cache ls
  lode cache ls --json
  lode cache gc --max-size 10G",
    ),
    (
        "inspect",
        "\
Show an image's superblock, feature bits, devices (blobs) and a summary of its tree. IMAGE is
an image directory or an EROFS image file (then its blobs are looked up next to it, or given
with --device).",
        "\
EXAMPLES:
  lode inspect img
  lode inspect img --json | jq .blobs",
    ),
    (
        "ls",
        "\
List a directory of an image (or show one entry) in `ls -l` style, without following symlinks
and without mounting. Without IMAGE, list the lode mounts of this machine.",
        "\
EXAMPLES:
  lode ls img /etc
  lode ls img /usr/bin/env --json
  lode ls --json",
    ),
    (
        "cat",
        "\
Write a regular file of an image to stdout, without mounting.",
        "\
EXAMPLES:
  lode cat img /etc/os-release",
    ),
    (
        "unpack",
        "\
Extract an image's whole tree into OUTDIR with ownership, modes, xattrs, times, hard links and
holes.",
        "\
EXAMPLES:
  lode unpack img ./rootfs",
    ),
];

/// The command tree with the manual's texts.
pub fn command<C: CommandFactory>() -> Command {
    let mut cmd = C::command()
        .long_about(LONG_ABOUT)
        .after_long_help(AFTER_LONG_HELP);
    for sub in cmd.get_subcommands_mut() {
        if let Some((_, long, examples)) = SUBCOMMANDS
            .iter()
            .find(|(name, _, _)| *name == sub.get_name())
        {
            *sub = std::mem::take(sub)
                .long_about(*long)
                .after_long_help(*examples);
        }
    }
    cmd
}

/// Parses the command line into `C` with the manual's texts; `lode __man [DIR]` writes the
/// manual pages as roff (to DIR as lode.1, lode-build.1, …; without DIR lode.1 to stdout).
pub fn parse<C: CommandFactory + FromArgMatches>() -> C {
    let args: Vec<_> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "__man") {
        let mut cmd = command::<C>().disable_help_subcommand(true);
        cmd.build();
        let result = match args.get(2) {
            Some(dir) => write_man_pages(&cmd, Path::new(dir)),
            None => render_page(&cmd, &mut std::io::stdout().lock()),
        };
        if let Err(e) = result {
            eprintln!("error: writing the manual: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    let matches = command::<C>().get_matches();
    C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// lode.1 and one page per visible subcommand (lode-build.1, …) in `dir`.
fn write_man_pages(cmd: &Command, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut page = Vec::new();
    render_page(cmd, &mut page)?;
    std::fs::write(dir.join("lode.1"), page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // The process ends right after: leaking the names clap wants as 'static is fine.
        let name: &'static str = format!("lode-{}", sub.get_name()).leak();
        let mut page = Vec::new();
        render_page(&sub.clone().name(name), &mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
    }
    Ok(())
}

/// One manual page: clap_mangen's title, synopsis, options and subcommands; the description
/// and the sections of the long help (EXAMPLES, ENVIRONMENT, …) with their layout kept.
fn render_page(cmd: &Command, w: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    writeln!(w, ".SH DESCRIPTION")?;
    let about = cmd.get_long_about().or(cmd.get_about());
    write_text(w, &about.map(|a| a.to_string()).unwrap_or_default())?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(w)?;
    }
    let after = cmd.get_after_long_help().map(|a| a.to_string());
    for (title, body) in sections(after.as_deref().unwrap_or("")) {
        writeln!(w, ".SH {title}")?;
        write_text(w, &body)?;
    }
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

/// `TITLE:` lines and the (dedented) text under each.
fn sections(text: &str) -> Vec<(&str, String)> {
    let mut out: Vec<(&str, String)> = Vec::new();
    for line in text.lines() {
        match line.strip_suffix(':') {
            Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_uppercase() || b == b' ') => {
                out.push((t, String::new()))
            }
            _ => {
                if let Some((_, body)) = out.last_mut() {
                    body.push_str(line.strip_prefix("  ").unwrap_or(line));
                    body.push('\n');
                }
            }
        }
    }
    out
}

/// Paragraphs; one with indented lines keeps its line breaks (`.nf`).
fn write_text(w: &mut dyn Write, text: &str) -> io::Result<()> {
    for para in text.split("\n\n").map(|p| p.trim_matches('\n')) {
        if para.is_empty() {
            continue;
        }
        let keep = para.lines().any(|l| l.starts_with(' '));
        writeln!(w, ".PP")?;
        if keep {
            writeln!(w, ".nf")?;
        }
        for line in para.lines() {
            let line = line.replace('\\', "\\e").replace('-', "\\-");
            if line.starts_with(['.', '\'']) {
                write!(w, "\\&")?;
            }
            writeln!(w, "{line}")?;
        }
        if keep {
            writeln!(w, ".fi")?;
        }
    }
    Ok(())
}
