//! Random layer stacks against a model of OCI layer application (no root needed).
//!
//! The model applies a layer the way a sequential extractor does after removing what the
//! layer's whiteouts hide (which is what the spec's "whiteouts only affect lower layers,
//! whatever their order in the tar" comes to): first every `.wh.NAME` and `.wh..wh..opq` of
//! the layer against the tree below it, then the other entries in tar order (last wins, a
//! directory over a directory keeps the children). The image lode builds from the same tars,
//! read back with `lode_format::reader`, must hold exactly the model's tree: types, modes,
//! contents, symlink targets and hard-link groups. A hard link to an entry that is not there
//! (or is a directory) must be a build error in both.

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read, Write};
use std::path::Path;

use lode_builder::{BuildOptions, BuildReport};
use lode_format::blob::Compression;
use lode_format::manifest::ImageManifest;
use lode_format::reader::Image;
use proptest::prelude::*;

type P = Vec<String>;
/// Inode → (mode, data).
type Inodes = HashMap<u64, (u32, Vec<u8>)>;
/// Paths sharing an inode, with its (mode, data).
type Group = (Vec<P>, (u32, Vec<u8>));

#[derive(Debug, Clone)]
enum Op {
    Dir(P, u32),
    File(P, u8, usize, u32),
    Symlink(P, String),
    /// A hard link to the k-th (mod count) file written earlier in the same layer.
    Link(P, usize),
    Whiteout(P),
    /// `.wh..wh..opq` in this directory (empty: the root).
    Opaque(P),
}

fn path_strategy() -> impl Strategy<Value = P> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3)
        .prop_map(|v| v.into_iter().map(String::from).collect())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let mode = prop::sample::select(vec![0o700u32, 0o750, 0o755, 0o644, 0o600]);
    prop_oneof![
        3 => (path_strategy(), mode.clone()).prop_map(|(p, m)| Op::Dir(p, m)),
        5 => (path_strategy(), 0u8..4, prop::sample::select(vec![0usize, 7, 300, 600, 5000, 9000]), mode)
            .prop_map(|(p, s, n, m)| Op::File(p, s, n, m)),
        1 => (path_strategy(), "/?[a-z]{1,6}(/[a-z]{1,6}){0,2}").prop_map(|(p, t)| Op::Symlink(p, t)),
        2 => (path_strategy(), 0usize..8).prop_map(|(p, k)| Op::Link(p, k)),
        3 => path_strategy().prop_map(Op::Whiteout),
        2 => prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..=2)
            .prop_map(|v| Op::Opaque(v.into_iter().map(String::from).collect())),
    ]
}

fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed as u32 * 97) as u8
                >> 1
        })
        .collect()
}

/// One tar entry as written (ancestors are always written as directories first).
#[derive(Debug, Clone)]
enum TarOp {
    Dir(P, u32),
    File(P, Vec<u8>, u32),
    Symlink(P, String),
    Link(P, P),
    Whiteout(P),
}

fn expand(ops: &[Op]) -> Vec<TarOp> {
    let mut out = Vec::new();
    let mut files: Vec<P> = Vec::new();
    let parents = |p: &P, out: &mut Vec<TarOp>| {
        for i in 1..p.len() {
            out.push(TarOp::Dir(p[..i].to_vec(), 0o755));
        }
    };
    for op in ops {
        match op {
            Op::Dir(p, m) => {
                parents(p, &mut out);
                out.push(TarOp::Dir(p.clone(), *m));
            }
            Op::File(p, s, n, m) => {
                parents(p, &mut out);
                out.push(TarOp::File(p.clone(), content(*s, *n), *m));
                files.push(p.clone());
            }
            Op::Symlink(p, t) => {
                parents(p, &mut out);
                out.push(TarOp::Symlink(p.clone(), t.clone()));
            }
            Op::Link(p, k) => {
                if files.is_empty() {
                    continue;
                }
                parents(p, &mut out);
                out.push(TarOp::Link(p.clone(), files[k % files.len()].clone()));
            }
            Op::Whiteout(p) => {
                parents(p, &mut out);
                let mut w = p.clone();
                let last = w.pop().unwrap();
                w.push(format!(".wh.{last}"));
                out.push(TarOp::Whiteout(w));
            }
            Op::Opaque(d) => {
                let mut w = d.clone();
                w.push(".wh..wh..opq".into());
                parents(&w, &mut out);
                out.push(TarOp::Whiteout(w));
            }
        }
    }
    out
}

fn tar_bytes(ops: &[TarOp]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for op in ops {
        match op {
            TarOp::Dir(p, m) => {
                let mut h = header(tar::EntryType::Directory, *m, 0);
                b.append_data(&mut h, format!("{}/", p.join("/")), &[][..])
                    .unwrap();
            }
            TarOp::File(p, data, m) => {
                let mut h = header(tar::EntryType::Regular, *m, data.len() as u64);
                b.append_data(&mut h, p.join("/"), &data[..]).unwrap();
            }
            TarOp::Whiteout(p) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, p.join("/"), &[][..]).unwrap();
            }
            TarOp::Symlink(p, t) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p.join("/"), t).unwrap();
            }
            TarOp::Link(p, t) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, p.join("/"), t.join("/")).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum M {
    Dir(u32),
    File(u64),
    Symlink(String),
}

/// The model: path → entry, and file inodes (mode, data).
#[derive(Debug, Default)]
struct Model {
    entries: BTreeMap<P, M>,
    inodes: Inodes,
    next_ino: u64,
}

impl Model {
    fn remove_subtree(&mut self, p: &P) {
        self.entries.retain(|k, _| !k.starts_with(p));
    }

    fn clear_children(&mut self, d: &P) {
        if d.is_empty() || matches!(self.entries.get(d), Some(M::Dir(_))) {
            self.entries
                .retain(|k, _| !(k.starts_with(d) && k.len() > d.len()));
        }
    }

    /// Applies a layer; `Err(link path)` for an invalid hard link.
    fn apply(&mut self, ops: &[TarOp]) -> Result<(), P> {
        for op in ops {
            if let TarOp::Whiteout(w) = op {
                let (name, dir) = w.split_last().unwrap();
                if name == ".wh..wh..opq" {
                    self.clear_children(&dir.to_vec());
                } else {
                    let mut target = dir.to_vec();
                    target.push(name[4..].to_string());
                    // Only if every ancestor is a directory (else nothing is there).
                    if (1..target.len())
                        .all(|i| matches!(self.entries.get(&target[..i]), Some(M::Dir(_))))
                    {
                        self.remove_subtree(&target);
                    }
                }
            }
        }
        for op in ops {
            match op {
                TarOp::Whiteout(_) => {}
                TarOp::Dir(p, m) => match self.entries.get_mut(p) {
                    Some(M::Dir(mode)) => *mode = *m,
                    _ => {
                        self.remove_subtree(p);
                        self.entries.insert(p.clone(), M::Dir(*m));
                    }
                },
                TarOp::File(p, data, m) => {
                    self.remove_subtree(p);
                    self.next_ino += 1;
                    self.inodes.insert(self.next_ino, (*m, data.clone()));
                    self.entries.insert(p.clone(), M::File(self.next_ino));
                }
                TarOp::Symlink(p, t) => {
                    self.remove_subtree(p);
                    self.entries.insert(p.clone(), M::Symlink(t.clone()));
                }
                TarOp::Link(p, t) => {
                    let target = match self.entries.get(t) {
                        Some(M::Dir(_)) | None => return Err(p.clone()),
                        Some(e) => e.clone(),
                    };
                    if p != t {
                        self.remove_subtree(p);
                        self.entries.insert(p.clone(), target);
                    }
                }
            }
        }
        Ok(())
    }
}

/// What an image holds, in the model's terms (inode numbers are nids).
fn read_image(dir: &Path) -> (BTreeMap<P, M>, Inodes, u32) {
    let manifest: ImageManifest =
        serde_json::from_slice(&std::fs::read(dir.join("image.json")).unwrap()).unwrap();
    let mut image = Image::open(Box::new(
        std::fs::File::open(dir.join("bootstrap")).unwrap(),
    ))
    .unwrap();
    for (i, b) in manifest.blobs.iter().enumerate() {
        let f = std::fs::File::open(dir.join("blobs").join(b.hex())).unwrap();
        image.set_device(i, Box::new(f));
    }
    let mut entries = BTreeMap::new();
    let mut inodes = HashMap::new();
    let root = image.inode(image.root_nid()).unwrap();
    let root_mode = root.mode & 0o7777;
    let mut stack = vec![(Vec::<String>::new(), root)];
    while let Some((path, dir)) = stack.pop() {
        for e in image.read_dir(&dir).unwrap() {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let mut p = path.clone();
            p.push(String::from_utf8(e.name.clone()).unwrap());
            let ino = image.inode(e.nid).unwrap();
            let mode = ino.mode & 0o7777;
            if ino.is_dir() {
                entries.insert(p.clone(), M::Dir(mode));
                stack.push((p, ino));
            } else if ino.is_symlink() {
                let t = String::from_utf8(image.readlink(&ino).unwrap()).unwrap();
                entries.insert(p, M::Symlink(t));
            } else {
                let mut data = vec![0u8; ino.size as usize];
                let mut done = 0;
                while done < data.len() {
                    let n = image.read_at(&ino, done as u64, &mut data[done..]).unwrap();
                    assert!(n > 0);
                    done += n;
                }
                inodes.insert(e.nid, (mode, data));
                entries.insert(p, M::File(e.nid));
            }
        }
    }
    (entries, inodes, root_mode)
}

/// Paths grouped by inode, with the inode's (mode, data).
fn groups(entries: &BTreeMap<P, M>, inodes: &Inodes) -> Vec<Group> {
    let mut by: BTreeMap<u64, Vec<P>> = BTreeMap::new();
    for (p, e) in entries {
        if let M::File(i) = e {
            by.entry(*i).or_default().push(p.clone());
        }
    }
    let mut out: Vec<_> = by
        .into_iter()
        .map(|(i, ps)| (ps, inodes[&i].clone()))
        .collect();
    out.sort();
    out
}

fn shape(entries: &BTreeMap<P, M>) -> BTreeMap<P, M> {
    entries
        .iter()
        .map(|(p, e)| {
            (
                p.clone(),
                match e {
                    M::File(_) => M::File(0),
                    other => other.clone(),
                },
            )
        })
        .collect()
}

fn compress(tar: Vec<u8>, how: u8) -> Vec<u8> {
    match how {
        0 => tar,
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        }
        _ => zstd::encode_all(&tar[..], 1).unwrap(),
    }
}

fn build(
    layers: &[Vec<u8>],
    out: &Path,
    inline_max: u64,
    threads: usize,
) -> anyhow::Result<BuildReport> {
    let readers: Vec<Box<dyn Read + Send>> = layers
        .iter()
        .map(|l| Box::new(Cursor::new(l.clone())) as Box<dyn Read + Send>)
        .collect();
    lode_builder::build_layer_streams(
        readers,
        out,
        &BuildOptions {
            chunk_size: 4096,
            inline_max,
            threads,
            compression: Compression::None,
            ..BuildOptions::default()
        },
        None,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn layer_stacks_match_the_model(
        layers in prop::collection::vec(
            (prop::collection::vec(op_strategy(), 1..14), 0u8..3),
            1..5,
        ),
        inline_max in prop::sample::select(vec![0u64, 512]),
        threads in 1usize..4,
    ) {
        let expanded: Vec<Vec<TarOp>> = layers.iter().map(|(ops, _)| expand(ops)).collect();
        let tars: Vec<Vec<u8>> = expanded
            .iter()
            .zip(&layers)
            .map(|(ops, (_, how))| compress(tar_bytes(ops), *how))
            .collect();
        let mut model = Model::default();
        let mut expected_err = None;
        for (i, ops) in expanded.iter().enumerate() {
            if let Err(p) = model.apply(ops) {
                expected_err = Some((i + 1, p.join("/")));
                break;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("img");
        let result = build(&tars, &out, inline_max, threads);
        match (expected_err, result) {
            (Some((layer, path)), Err(e)) => {
                let msg = format!("{e:#}");
                prop_assert!(
                    msg.contains(&format!("layer {layer} ")) && msg.contains(&format!("{path:?}")),
                    "{msg}"
                );
            }
            (Some(err), Ok(_)) => prop_assert!(false, "expected an error about {err:?}"),
            (None, Err(e)) => prop_assert!(false, "unexpected error: {e:#}"),
            (None, Ok(_)) => {
                let (entries, inodes, root_mode) = read_image(&out);
                prop_assert_eq!(root_mode, 0o755);
                prop_assert_eq!(shape(&entries), shape(&model.entries));
                prop_assert_eq!(groups(&entries, &inodes), groups(&model.entries, &model.inodes));
            }
        }
    }
}

#[test]
fn same_layers_same_image_whatever_the_thread_count() {
    let ops = vec![
        Op::File(vec!["a".into(), "b".into()], 1, 9000, 0o644),
        Op::File(vec!["c".into()], 1, 9000, 0o600),
        Op::Link(vec!["b".into()], 0),
        Op::Opaque(vec!["a".into()]),
        Op::Whiteout(vec!["c".into()]),
    ];
    let layers = vec![
        compress(tar_bytes(&expand(&ops)), 1),
        compress(tar_bytes(&expand(&ops[2..])), 2),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    build(&layers, &a, 512, 1).unwrap();
    build(&layers, &b, 512, 4).unwrap();
    for f in ["bootstrap", "image.json"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap()
        );
    }
}
