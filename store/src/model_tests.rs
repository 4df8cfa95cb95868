//! Model-based property tests: random operation sequences, with crashes injected at any
//! I/O call, against the simulated backend. After every reopen, every tracker must hold
//! every chunk whose content changed since the tracker started (or since it was cleared),
//! and every cached hash must equal the hash of the chunk's actual content.
//!
//! The second property adds what a failing or full disk does (a failed fsync of the data
//! or the chunk hashes, a failed metadata write, a torn activity-log append, `ENOSPC`)
//! and a chunk-hash cache of a few pages (so hash pages are evicted and written back
//! between checkpoints), and checks two more things: what a successful flush
//! acknowledged survives power loss, and a failed image stays failed.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use crate::sim::{Fault, SimBackend};
use crate::{DiskImage, Geometry, HashTree, StoreError, hash_chunk};

const CHUNK: u32 = 512;
const NAMES: [&str; 3] = ["a", "b", "c"];

/// The image a run works on.
#[derive(Clone, Copy, Debug)]
struct Config {
    size: u64,
    /// Chunk-hash pages cached (None: the default).
    cache_pages: Option<usize>,
    faults: bool,
}

/// 23 chunks and a short last one: one chunk-hash page.
const SMALL: Config = Config {
    size: 23 * CHUNK as u64 + 100,
    cache_pages: None,
    faults: false,
};

/// 600 chunks (5 chunk-hash pages) with a cache of 4 pages, and disk faults.
const PAGED_FAULTY: Config = Config {
    size: 600 * CHUNK as u64 - 17,
    cache_pages: Some(4),
    faults: true,
};

fn geometry(cfg: Config) -> Geometry {
    Geometry::with_params(cfg.size, CHUNK, 4, 3).unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: u64,
        byte: u8,
    },
    Zeroes {
        off: u64,
        len: u64,
    },
    Flush,
    Checkpoint,
    Hash(u64),
    HashAll,
    Start(usize),
    Drop(usize),
    Clear(usize),
    /// Arm a failpoint: the n-th mutating I/O call from now dies part-way.
    FailAfter(u64),
    Crash {
        power_loss: bool,
        fail_reopen: Option<u64>,
    },
    CloseReopen,
    /// The disk fails the next call of this kind.
    Inject(Fault),
    /// The file system becomes full, or not.
    Full(bool),
}

fn op(cfg: Config) -> BoxedStrategy<Op> {
    let size = cfg.size;
    let chunks = geometry(cfg).chunk_count();
    let base = prop_oneof![
        6 => (0..size, 1u64..1500, 1u8..=255).prop_map(move |(off, len, byte)| Op::Write {
            off,
            len: len.min(size - off),
            byte
        }),
        1 => (0..size, 1u64..1500).prop_map(move |(off, len)| Op::Zeroes { off, len: len.min(size - off) }),
        2 => Just(Op::Flush),
        2 => Just(Op::Checkpoint),
        2 => (0..chunks + 1).prop_map(Op::Hash),
        1 => Just(Op::HashAll),
        2 => (0..3usize).prop_map(Op::Start),
        1 => (0..3usize).prop_map(Op::Drop),
        2 => (0..3usize).prop_map(Op::Clear),
        2 => (0..8u64).prop_map(Op::FailAfter),
        2 => (any::<bool>(), proptest::option::of(0..4u64))
            .prop_map(|(power_loss, fail_reopen)| Op::Crash { power_loss, fail_reopen }),
        1 => Just(Op::CloseReopen),
    ];
    if !cfg.faults {
        return base.boxed();
    }
    prop_oneof![
        24 => base,
        1 => prop_oneof![
            Just(Fault::DataSyncFails),
            Just(Fault::HashSyncFails),
            Just(Fault::TornAppend),
            Just(Fault::MetaFails),
        ]
        .prop_map(Op::Inject),
        1 => any::<bool>().prop_map(Op::Full),
    ]
    .boxed()
}

struct Model {
    cfg: Config,
    /// Image content each tracker last agreed with (at start, or per chunk at clear).
    baselines: BTreeMap<String, Vec<u8>>,
    /// Trackers that must exist (start returned Ok and no drop was attempted).
    certain: BTreeSet<String>,
    /// The content as of the last successful flush (or checkpoint, close, crash).
    acked: Vec<u8>,
    /// Bytes a write (successful or not) touched since then.
    touched: Vec<bool>,
    /// A fault was injected in this incarnation (it may fail the image).
    injected: bool,
    /// The image reported itself failed.
    failed: bool,
    full: bool,
}

impl Model {
    fn touch(&mut self, off: u64, len: u64) {
        self.touched[off as usize..(off + len) as usize].fill(true);
    }

    /// Everything visible is durable now.
    fn acknowledge(&mut self, sim: &SimBackend) {
        self.acked = sim.image();
        self.touched.fill(false);
    }

    /// After a crash: what was acknowledged and not touched since is still there.
    fn after_crash(&mut self, sim: &SimBackend) -> Result<(), TestCaseError> {
        let now = sim.image();
        for (i, t) in self.touched.iter().enumerate() {
            if !t {
                prop_assert_eq!(
                    now[i],
                    self.acked[i],
                    "byte {} acknowledged by a flush was lost",
                    i
                );
            }
        }
        self.acknowledge(sim);
        self.injected = false;
        self.failed = false;
        Ok(())
    }
}

fn chunk_bytes(img: &[u8], c: u64) -> &[u8] {
    let start = (c * u64::from(CHUNK)) as usize;
    &img[start..(start + CHUNK as usize).min(img.len())]
}

fn check(img: &DiskImage<SimBackend>, model: &Model) -> Result<(), TestCaseError> {
    let content = img.backend().image();
    let n = img.chunk_count();
    for c in 0..n {
        if let Some(h) = img.cached_hash(c) {
            prop_assert_eq!(
                h,
                hash_chunk(chunk_bytes(&content, c)),
                "stale hash of chunk {}",
                c
            );
        }
    }
    let existing: BTreeSet<String> = img.trackers().into_iter().collect();
    for name in &model.certain {
        prop_assert!(existing.contains(name), "tracker {} lost", name);
    }
    for name in &existing {
        let Some(base) = model.baselines.get(name) else {
            prop_assert!(
                false,
                "tracker {} resurrected after a successful drop",
                name
            );
            continue;
        };
        let dirty: BTreeSet<u64> = img.dirty_chunks(name).unwrap().chunks.into_iter().collect();
        for c in 0..n {
            if chunk_bytes(&content, c) != chunk_bytes(base, c) {
                prop_assert!(
                    dirty.contains(&c),
                    "tracker {} misses changed chunk {}",
                    name,
                    c
                );
            }
        }
    }
    prop_assert_eq!(img.failure().is_some(), model.failed);
    Ok(())
}

/// Opens the image after a crash, crashing again if a failpoint fires during recovery,
/// and making room if the file system is too full to recover.
fn reopen(
    sim: &SimBackend,
    model: &mut Model,
    power_loss: bool,
    fail_reopen: Option<u64>,
) -> Result<DiskImage<SimBackend>, TestCaseError> {
    sim.crash(power_loss);
    model.after_crash(sim)?;
    if let Some(n) = fail_reopen {
        sim.fail_after(n);
        match DiskImage::open_on(sim.clone()) {
            Ok(img) if !sim.is_dead() => return Ok(configure(img, model.cfg)),
            // Died during recovery (or just after): crash again, recover again.
            _ => {
                sim.crash(power_loss);
                model.after_crash(sim)?;
            }
        }
    }
    let img = match DiskImage::open_on(sim.clone()) {
        Err(e) if e.is_no_space() => {
            prop_assert!(model.full, "ENOSPC while not full: {}", e);
            sim.set_full(false);
            model.full = false;
            DiskImage::open_on(sim.clone()).unwrap()
        }
        r => r.unwrap(),
    };
    Ok(configure(img, model.cfg))
}

fn configure(img: DiskImage<SimBackend>, cfg: Config) -> DiskImage<SimBackend> {
    img.set_activity_limit(2);
    if let Some(p) = cfg.cache_pages {
        img.set_hash_cache_pages(p);
    }
    img
}

fn run(cfg: Config, ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
    let sim = SimBackend::new(cfg.size, seed);
    let mut img = configure(
        DiskImage::create_on(sim.clone(), geometry(cfg)).unwrap(),
        cfg,
    );
    let mut model = Model {
        cfg,
        baselines: BTreeMap::new(),
        certain: BTreeSet::new(),
        acked: sim.image(),
        touched: vec![false; cfg.size as usize],
        injected: false,
        failed: false,
        full: false,
    };
    for (step, op) in ops.into_iter().enumerate() {
        let power_loss = seed.rotate_left(step as u32) & 1 == 1;
        let was_failed = model.failed;
        let res: Result<(), StoreError> = match op.clone() {
            Op::Write { off, len, byte } => {
                model.touch(off, len);
                img.write_at(&vec![byte; len as usize], off)
            }
            Op::Zeroes { off, len } => {
                model.touch(off, len);
                img.write_zeroes(off, len)
            }
            Op::Flush => img.flush().inspect(|()| model.acknowledge(&sim)),
            Op::Checkpoint => img.checkpoint().inspect(|()| model.acknowledge(&sim)),
            Op::Hash(c) => match img.chunk_hash(c) {
                Err(StoreError::OutOfRange { .. }) if c >= img.chunk_count() => Ok(()),
                r => r.map(|_| ()),
            },
            Op::HashAll => img.hash_all().map(|_| ()),
            Op::Start(i) => {
                let name = NAMES[i];
                if img.trackers().iter().any(|t| t == name) {
                    Ok(())
                } else {
                    model.baselines.insert(name.into(), sim.image());
                    let r = img.start_tracking(name);
                    if r.is_ok() {
                        model.certain.insert(name.into());
                    }
                    r
                }
            }
            Op::Drop(i) => {
                let name = NAMES[i];
                if !img.trackers().iter().any(|t| t == name) {
                    Ok(())
                } else {
                    model.certain.remove(name);
                    let r = img.drop_tracking(name);
                    if r.is_ok() {
                        model.baselines.remove(name);
                    }
                    r
                }
            }
            Op::Clear(i) => {
                let name = NAMES[i];
                match img.dirty_chunks(name) {
                    Ok(d) => {
                        let content = sim.image();
                        if let Some(base) = model.baselines.get_mut(name) {
                            for &c in &d.chunks {
                                let s = (c * u64::from(CHUNK)) as usize;
                                let e = (s + CHUNK as usize).min(content.len());
                                base[s..e].copy_from_slice(&content[s..e]);
                            }
                        }
                        img.clear(name, &d.chunks, d.as_of).map(|_| ())
                    }
                    Err(StoreError::UnknownTracker(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Op::FailAfter(n) => {
                sim.fail_after(n);
                Ok(())
            }
            Op::Inject(f) => {
                sim.inject(f);
                model.injected = true;
                Ok(())
            }
            Op::Full(full) => {
                sim.set_full(full);
                model.full = full;
                Ok(())
            }
            Op::Crash {
                power_loss,
                fail_reopen,
            } => {
                drop(img);
                img = reopen(&sim, &mut model, power_loss, fail_reopen)?;
                check(&img, &model)?;
                Ok(())
            }
            Op::CloseReopen => {
                let closed = img.close();
                drop(img);
                if closed.is_ok() && !sim.is_dead() {
                    model.acknowledge(&sim);
                    sim.crash(false);
                    model.after_crash(&sim)?;
                    img = configure(DiskImage::open_on(sim.clone()).unwrap(), cfg);
                    prop_assert!(img.recovery().clean, "clean close not recognised");
                    prop_assert_eq!(img.recovery().untrusted_chunks, 0);
                } else {
                    img = reopen(&sim, &mut model, power_loss, None)?;
                }
                Ok(())
            }
        };
        // A failed image refuses every write, flush and checkpoint.
        if was_failed
            && !sim.is_dead()
            && matches!(
                op,
                Op::Write { .. } | Op::Zeroes { .. } | Op::Flush | Op::Checkpoint
            )
        {
            prop_assert!(
                matches!(res, Err(StoreError::Failed { .. })),
                "step {} ({:?}) on a failed image gave {:?}",
                step,
                op,
                res
            );
        }
        if let Err(e) = res {
            if sim.is_dead() {
                drop(img);
                img = reopen(&sim, &mut model, power_loss, None)?;
            } else if matches!(e, StoreError::Failed { .. }) {
                prop_assert!(
                    model.injected,
                    "step {} ({:?}) failed the image: {}",
                    step,
                    op,
                    e
                );
                model.failed = true;
            } else if e.is_no_space() {
                prop_assert!(
                    model.full,
                    "step {} ({:?}): ENOSPC while not full",
                    step,
                    op
                );
            } else {
                prop_assert!(false, "unexpected error at step {} ({:?}): {}", step, op, e);
            }
        }
        check(&img, &model)?;
    }
    // Whatever happened, a full rehash gives a tree equal to one built from the content.
    // (Hashing writes chunk-hash pages, so an armed failpoint may fire here.)
    sim.set_full(false);
    if img.hash_all().is_err() {
        prop_assert!(sim.is_dead(), "hash_all failed on a live image");
        drop(img);
        img = reopen(&sim, &mut model, false, None)?;
        img.hash_all().unwrap();
    }
    let content = sim.image();
    let fresh: Vec<_> = (0..img.chunk_count())
        .map(|c| hash_chunk(chunk_bytes(&content, c)))
        .collect();
    prop_assert_eq!(img.root().unwrap(), HashTree::from_leaves(fresh, 3).root());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn trackers_and_hashes_survive_crashes_anywhere(
        ops in proptest::collection::vec(op(SMALL), 1..60),
        seed in any::<u64>(),
    ) {
        run(SMALL, ops, seed)?;
    }
}

/// Cases of the faulty-disk property (`CONVOY_MODEL_CASES` overrides, for longer runs).
fn faulty_cases() -> u32 {
    std::env::var("CONVOY_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: faulty_cases(), ..ProptestConfig::default() })]

    #[test]
    fn acknowledged_writes_hashes_and_trackers_survive_disk_faults_and_power_loss(
        ops in proptest::collection::vec(op(PAGED_FAULTY), 1..80),
        seed in any::<u64>(),
    ) {
        run(PAGED_FAULTY, ops, seed)?;
    }
}

#[test]
fn regression_tracker_started_then_crash_before_any_checkpoint() {
    // Deterministic smoke case: write in a fresh extent, crash with power loss, reopen.
    run(
        SMALL,
        vec![
            Op::Start(0),
            Op::Write {
                off: 0,
                len: 700,
                byte: 9,
            },
            Op::Hash(0),
            Op::Crash {
                power_loss: true,
                fail_reopen: Some(1),
            },
            Op::FailAfter(2),
            Op::Write {
                off: 5000,
                len: 10,
                byte: 3,
            },
            Op::Checkpoint,
            Op::Write {
                off: 3000,
                len: 10,
                byte: 4,
            },
        ],
        7,
    )
    .unwrap();
}

mod interleavings {
    //! Checkpoints racing with writes, forced with the simulator's gates.

    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::sim::Gate;

    fn dirty(img: &DiskImage<SimBackend>, name: &str) -> Vec<u64> {
        img.dirty_chunks(name).unwrap().chunks
    }

    #[test]
    fn regression_checkpoint_during_inflight_write_keeps_its_extent_active() {
        let sim = SimBackend::new(SMALL.size, 1);
        let img = Arc::new(DiskImage::create_on(sim.clone(), geometry(SMALL)).unwrap());
        img.start_tracking("r").unwrap();
        sim.pause(Gate::Writes);
        let writer = {
            let img = img.clone();
            thread::spawn(move || img.write_at(&[5; 10], 9 * u64::from(CHUNK)))
        };
        assert!(sim.wait_held(1, Duration::from_secs(10)));
        // The write is admitted (its extent is in the log) but its data has not landed;
        // the checkpoint's snapshot cannot reflect it.
        let ck = {
            let img = img.clone();
            thread::spawn(move || img.checkpoint())
        };
        // The checkpoint needs no write; let it finish while the data write is held.
        ck.join().unwrap().unwrap();
        sim.resume();
        writer.join().unwrap().unwrap();
        drop(img);
        sim.crash(false);
        let img = DiskImage::open_on(sim.clone()).unwrap();
        // The whole extent is distrusted.
        assert_eq!(dirty(&img, "r"), vec![8, 9, 10, 11]);
    }

    #[test]
    fn regression_write_admitted_during_checkpoint_keeps_its_extent_active() {
        let sim = SimBackend::new(SMALL.size, 2);
        let img = Arc::new(DiskImage::create_on(sim.clone(), geometry(SMALL)).unwrap());
        img.start_tracking("r").unwrap();
        img.write_at(&[1], 0).unwrap(); // extent 0 now active
        sim.pause(Gate::Syncs);
        let ck = {
            let img = img.clone();
            thread::spawn(move || img.checkpoint())
        };
        assert!(sim.wait_held(1, Duration::from_secs(10)));
        // Snapshot taken, metadata not yet written: this write is not in it.
        img.write_at(&[2], u64::from(CHUNK)).unwrap();
        sim.resume();
        ck.join().unwrap().unwrap();
        drop(img);
        sim.crash(false);
        let img = DiskImage::open_on(sim.clone()).unwrap();
        assert!(dirty(&img, "r").contains(&1), "{:?}", dirty(&img, "r"));
    }

    #[test]
    fn regression_hash_of_data_read_before_a_write_is_not_cached() {
        let sim = SimBackend::new(SMALL.size, 3);
        let img = Arc::new(DiskImage::create_on(sim.clone(), geometry(SMALL)).unwrap());
        img.write_at(&[1; 10], 0).unwrap();
        sim.pause(Gate::Reads);
        let hasher = {
            let img = img.clone();
            thread::spawn(move || img.chunk_hash(0))
        };
        assert!(sim.wait_held(1, Duration::from_secs(10)));
        // The hasher holds the old content; a write lands and returns meanwhile.
        img.write_at(&[2; 10], 0).unwrap();
        sim.resume();
        let stale = hasher.join().unwrap().unwrap();
        let now = hash_chunk(chunk_bytes(&sim.image(), 0));
        assert_ne!(stale, now);
        assert_eq!(img.cached_hash(0), None);
        assert_eq!(img.chunk_hash(0).unwrap(), now);
    }
}
