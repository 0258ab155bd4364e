//! A persistent pool of worker threads for the per-token path.
//!
//! Why not rayon: a decode step runs ~170 small parallel loops (seven matrix products per
//! layer plus attention), each 20–100 µs long. Rayon wakes sleeping workers through a mutex
//! and condition variable and allocates job frames in its deques; here a loop costs one
//! atomic store to publish, one atomic counter per chunk of work, and a spin on an atomic to
//! finish: no lock, no allocation, no thread spawn per token.
//!
//! Protocol: one atomic word `state` packs (job epoch, task count, next task index). The
//! caller (which takes part as worker 0) writes the job pointer, then publishes a new
//! state (release); anyone claims task `i` by a compare-and-swap from index `i` to `i + 1`
//! under the *same* epoch, reads the job pointer only after a successful claim, and counts
//! `done` when the task is finished. The caller returns once `done` equals the task count.
//! It never waits for a worker that has not claimed anything: on an oversubscribed machine
//! (other processes on our cores) a descheduled worker costs nothing, the caller just runs
//! more tasks itself. A worker that wakes up late sees a stale epoch or no task left and
//! cannot touch a finished job: the job (a borrowed closure) outlives every claimed task.
//! (The first version waited for every worker to check in; a 0.5B int4 decode under a
//! parallel compile spent 43% of its samples in that wait. Claiming plus `backoff`'s yield
//! took the same decode, same load, from 9.6 to 16.8 tokens/s.)
//!
//! Idle workers spin for `SPIN` before parking; `run` unparks only workers that said they
//! were parked. The pool is not reentrant: `busy` turns a nested or concurrent call into a
//! sequential run on the calling thread (no lock on the per-token path).

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking. Between two matrix products of a decode
/// step the gap is a few microseconds (norms, RoPE on one thread); between two tokens it is
/// the sampler's time (~0.1–1 ms for a 152k vocabulary). 2 ms keeps workers hot through both
/// without burning a core when the model is idle.
const SPIN: Duration = Duration::from_millis(2);

type Job = *const (dyn Fn(usize) + Sync);
/// A task over one chunk of each of two / three slices.
type Task2<'a, A, B> = &'a (dyn Fn(usize, &mut [A], &mut [B]) + Sync);
type Task3<'a, A, B, C> = &'a (dyn Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync);

const INDEX_BITS: u32 = 20;
const MAX_TASKS: usize = (1 << INDEX_BITS) - 1;

fn pack(epoch: u64, tasks: usize, index: usize) -> u64 {
    (epoch << (2 * INDEX_BITS)) | ((tasks as u64) << INDEX_BITS) | index as u64
}

fn unpack(state: u64) -> (u64, usize, usize) {
    let mask = (1u64 << INDEX_BITS) - 1;
    (
        state >> (2 * INDEX_BITS),
        ((state >> INDEX_BITS) & mask) as usize,
        (state & mask) as usize,
    )
}

/// Keeps the hot atomics on their own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

struct Shared {
    state: Padded<AtomicU64>,
    done: Padded<AtomicUsize>,
    /// The current job's closure; written only by the caller while no task is claimed.
    job: UnsafeCell<Option<Job>>,
    busy: AtomicBool,
    stop: AtomicBool,
    parked: Vec<AtomicBool>,
}

// SAFETY: `job` is written only by the thread holding `busy`, before it publishes the
// job's state and after every claimed task of the previous job is done; it is read only by
// a thread that has claimed a task of the current state (acquire on the claim's CAS), so
// the write happens before every read and no read overlaps a write.
unsafe impl Sync for Shared {}
// SAFETY: the raw job pointer is only dereferenced under the protocol above.
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool of `threads` threads in all: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            state: Padded(AtomicU64::new(0)),
            done: Padded(AtomicUsize::new(0)),
            job: UnsafeCell::new(None),
            busy: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            parked: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let shared = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name(format!("native-{}", w + 1))
                .spawn(move || worker(&shared, w))?;
            handles.push(handle);
        }
        let threads = handles.iter().map(|h| h.thread().clone()).collect();
        Ok(Self {
            shared,
            threads,
            handles,
        })
    }

    /// Threads taking part in a job (workers + the caller).
    pub fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Calls `f(i)` for every `i` in `0..tasks`, spread over the pool; returns when all are done.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        if tasks == 0 {
            return;
        }
        if tasks == 1
            || tasks > MAX_TASKS
            || self.handles.is_empty()
            || s.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            (0..tasks).for_each(f);
            return;
        }
        // SAFETY: we hold `busy` and every claimed task of the previous job is done, so no
        // thread reads `job` now. The lifetime is erased: the pointer is dereferenced only by
        // claimed tasks of this job, all finished before we return (the `done` wait below).
        unsafe {
            let job: Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f);
            *s.job.get() = Some(job);
        }
        let (epoch, _, _) = unpack(s.state.0.load(Ordering::Relaxed));
        let epoch = (epoch + 1) & ((1 << (64 - 2 * INDEX_BITS)) - 1);
        s.done.0.store(0, Ordering::Relaxed);
        // SeqCst pairs with the worker's SeqCst store of `parked` and load of `state`: either
        // we see its flag and unpark it, or it sees the new state and does not park.
        s.state.0.store(pack(epoch, tasks, 0), Ordering::SeqCst);
        for (w, t) in self.threads.iter().enumerate() {
            if s.parked[w].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        while claim_and_run(s) {}
        let mut spins = 0u32;
        while s.done.0.load(Ordering::Acquire) != tasks {
            backoff(&mut spins);
        }
        s.busy.store(false, Ordering::Release);
    }

    /// Splits `out` into chunks of `chunk` elements and calls `f(index, chunk)` for each, in
    /// parallel: the building block for "work split by output rows".
    pub fn for_chunks<T: Send>(
        &self,
        out: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let chunk = chunk.max(1);
        let len = out.len();
        let base = SendPtr(out.as_mut_ptr());
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            let n = chunk.min(len - start);
            // SAFETY: task `i` is run exactly once and gets elements start..start+n, which do
            // not overlap any other task's; `out` is mutably borrowed for the whole call.
            let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
            f(i, part);
        });
    }

    /// `for_chunks` over several outputs in one parallel loop: output `o` is cut into chunks of
    /// `chunks[o]` elements and `f(o, index, chunk)` runs for every chunk of every output.
    /// (Decode's q/k/v and gate/up products: one hand-off instead of three or two.)
    pub fn for_chunks_multi<const N: usize>(
        &self,
        outs: [&mut [f32]; N],
        chunks: [usize; N],
        f: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
    ) {
        let lens: [usize; N] = std::array::from_fn(|o| outs[o].len());
        let chunks: [usize; N] = std::array::from_fn(|o| chunks[o].max(1));
        let ptrs: [SendPtr<f32>; N] = outs.map(|o| SendPtr(o.as_mut_ptr()));
        let counts: [usize; N] = std::array::from_fn(|o| lens[o].div_ceil(chunks[o]));
        let total = counts.iter().sum();
        self.run(total, &|task| {
            let (o, t) = output_task(&counts, task);
            let start = t * chunks[o];
            let n = chunks[o].min(lens[o] - start);
            // SAFETY: task (o, t) is run exactly once and gets elements start..start+n of
            // output o, disjoint from every other task's; the outputs are distinct `&mut`
            // borrows held for the whole call.
            let part = unsafe { std::slice::from_raw_parts_mut(ptrs[o].get().add(start), n) };
            f(o, t, part);
        });
    }

    /// Like `for_chunks` over two slices at once (chunk `i` of each goes to task `i`).
    pub fn for_chunks2<A: Send, B: Send>(
        &self,
        a: &mut [A],
        a_chunk: usize,
        b: &mut [B],
        b_chunk: usize,
        tasks: usize,
        f: Task2<'_, A, B>,
    ) {
        assert!(a.len() >= tasks * a_chunk && b.len() >= tasks * b_chunk);
        let (pa, pb) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
        self.run(tasks, &|i| {
            // SAFETY: as in `for_chunks`: disjoint ranges per task, inside the asserted lengths.
            let (x, y) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.get().add(i * a_chunk), a_chunk),
                    std::slice::from_raw_parts_mut(pb.get().add(i * b_chunk), b_chunk),
                )
            };
            f(i, x, y);
        });
    }

    /// Like `for_chunks2` over three slices.
    #[allow(clippy::too_many_arguments)]
    pub fn for_chunks3<A: Send, B: Send, C: Send>(
        &self,
        a: (&mut [A], usize),
        b: (&mut [B], usize),
        c: (&mut [C], usize),
        tasks: usize,
        f: Task3<'_, A, B, C>,
    ) {
        let ((a, an), (b, bn), (c, cn)) = (a, b, c);
        assert!(a.len() >= tasks * an && b.len() >= tasks * bn && c.len() >= tasks * cn);
        let (pa, pb, pc) = (
            SendPtr(a.as_mut_ptr()),
            SendPtr(b.as_mut_ptr()),
            SendPtr(c.as_mut_ptr()),
        );
        self.run(tasks, &|i| {
            // SAFETY: as in `for_chunks`: disjoint ranges per task, inside the asserted lengths.
            let (x, y, z) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.get().add(i * an), an),
                    std::slice::from_raw_parts_mut(pb.get().add(i * bn), bn),
                    std::slice::from_raw_parts_mut(pc.get().add(i * cn), cn),
                )
            };
            f(i, x, y, z);
        });
    }

    /// Splits the columns of a row-major `[rows, stride]` matrix `out` into blocks of `block`
    /// columns (the last may be shorter, `width` columns in all) and calls
    /// `f(block, scratch)` for each in parallel, task `i` getting the `i`-th `per_task`-long
    /// piece of `scratch`: a GEMM split by output feature.
    #[allow(clippy::too_many_arguments)]
    pub fn for_column_blocks<S: Send>(
        &self,
        out: &mut [f32],
        rows: usize,
        stride: usize,
        width: usize,
        block: usize,
        scratch: (&mut [S], usize),
        f: &(dyn Fn(&mut ColumnBlock<'_>, &mut [S]) + Sync),
    ) {
        if rows == 0 || width == 0 {
            return;
        }
        assert!(width <= stride && out.len() >= (rows - 1) * stride + width);
        let block = block.max(1);
        let tasks = width.div_ceil(block);
        let (scratch, per_task) = scratch;
        assert!(scratch.len() >= tasks * per_task, "scratch too small");
        let base = SendPtr(out.as_mut_ptr());
        let sp = SendPtr(scratch.as_mut_ptr());
        self.run(tasks, &|i| {
            let start = i * block;
            let mut cols = ColumnBlock {
                ptr: base.get(),
                rows,
                stride,
                start,
                end: (start + block).min(width),
                _out: PhantomData,
            };
            // SAFETY: task `i` alone gets scratch[i * per_task..][..per_task] (asserted size).
            let s = unsafe { std::slice::from_raw_parts_mut(sp.get().add(i * per_task), per_task) };
            f(&mut cols, s);
        });
    }

    /// `for_column_blocks` over several outputs in one parallel loop (no scratch): output `o`
    /// is `[rows, widths[o]]`, cut into blocks of `blocks[o]` columns, and `f(o, block)` runs
    /// for every block of every output. (A decode batch's q/k/v and gate/up products: one
    /// hand-off instead of three or two, as `for_chunks_multi` for one row.)
    pub fn for_column_blocks_multi<const N: usize>(
        &self,
        outs: [&mut [f32]; N],
        rows: usize,
        widths: [usize; N],
        blocks: [usize; N],
        f: &(dyn Fn(usize, &mut ColumnBlock<'_>) + Sync),
    ) {
        for (out, &width) in outs.iter().zip(&widths) {
            assert!(out.len() >= rows * width, "output too small");
        }
        let blocks: [usize; N] = blocks.map(|b| b.max(1));
        let counts: [usize; N] = std::array::from_fn(|o| widths[o].div_ceil(blocks[o]));
        let ptrs: [SendPtr<f32>; N] = outs.map(|o| SendPtr(o.as_mut_ptr()));
        let total = if rows == 0 { 0 } else { counts.iter().sum() };
        self.run(total, &|task| {
            let (o, t) = output_task(&counts, task);
            let start = t * blocks[o];
            let mut cols = ColumnBlock {
                ptr: ptrs[o].get(),
                rows,
                stride: widths[o],
                start,
                end: (start + blocks[o]).min(widths[o]),
                _out: PhantomData,
            };
            f(o, &mut cols);
        });
    }
}

/// Task `task` of a loop over several outputs with `counts[o]` tasks each, as (output, its task).
fn output_task(counts: &[usize], mut task: usize) -> (usize, usize) {
    let mut o = 0;
    while task >= counts[o] {
        task -= counts[o];
        o += 1;
    }
    (o, task)
}

/// Columns `start..end` of a row-major output matrix, owned by one task.
pub struct ColumnBlock<'a> {
    ptr: *mut f32,
    pub rows: usize,
    pub stride: usize,
    pub start: usize,
    pub end: usize,
    _out: PhantomData<&'a mut [f32]>,
}

impl ColumnBlock<'_> {
    /// This block's part of output row `i`.
    pub fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows);
        // SAFETY: `for_column_blocks(_multi)` checked that every row's `0..width` lies inside
        // `out`, and column blocks of different tasks do not overlap.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.add(i * self.stride + self.start),
                self.end - self.start,
            )
        }
    }

    /// Columns `from..to` of this block (relative to `start`), as a block of their own.
    pub fn sub(&mut self, from: usize, to: usize) -> ColumnBlock<'_> {
        assert!(from <= to && self.start + to <= self.end);
        ColumnBlock {
            ptr: self.ptr,
            rows: self.rows,
            stride: self.stride,
            start: self.start + from,
            end: self.start + to,
            _out: PhantomData,
        }
    }

    /// Pointer to element (0, start), for GEMM routines that take raw strides. Writes through
    /// it must stay within rows `0..rows` and columns `start..end`.
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        // SAFETY: row 0, column `start` is inside `out` (checked in `for_column_blocks(_multi)`).
        unsafe { self.ptr.add(self.start) }
    }
}

struct SendPtr<T>(*mut T);

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    // A method (not field access) so closures capture the whole Sync wrapper.
    fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: only used to hand disjoint sub-slices of a `&mut [T]` (T: Send) to pool tasks.
unsafe impl<T: Send> Sync for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SendPtr<T> {}

/// Claims one task of the current job and runs it; false when none is left.
fn claim_and_run(s: &Shared) -> bool {
    let mut state = s.state.0.load(Ordering::Acquire);
    loop {
        let (epoch, tasks, index) = unpack(state);
        if index >= tasks {
            return false;
        }
        match s.state.0.compare_exchange_weak(
            state,
            pack(epoch, tasks, index + 1),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // SAFETY: we own a claimed, unfinished task of the job this state was
                // published for, so `job` holds that job (written before the publishing
                // store we synchronized with) and the caller keeps it alive until `done`
                // counts our task.
                let job = unsafe { (*s.job.get()).expect("job published") };
                // SAFETY: see above; the closure is Sync.
                unsafe { (*job)(index) };
                s.done.0.fetch_add(1, Ordering::Release);
                return true;
            }
            Err(now) => state = now,
        }
    }
}

/// Waiting on an atomic: a short spin, then `yield_now` between checks. On a quiet machine
/// a job is picked up within a microsecond either way; on an oversubscribed one (a compile
/// next to the benchmark) a pure spin burns the time slice the thread we wait for needs.
fn backoff(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if *spins < 200 {
        std::hint::spin_loop();
    } else {
        thread::yield_now();
    }
}

fn worker(s: &Shared, w: usize) {
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        if claim_and_run(s) {
            idle_since = Instant::now();
            spins = 0;
            continue;
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        if spins % 256 == 255 && idle_since.elapsed() > SPIN {
            s.parked[w].store(true, Ordering::SeqCst);
            // Re-check after announcing: a job published before the flag was visible did not
            // unpark us.
            let (_, tasks, index) = unpack(s.state.0.load(Ordering::SeqCst));
            if index >= tasks && !s.stop.load(Ordering::SeqCst) {
                thread::park_timeout(Duration::from_millis(100));
            }
            s.parked[w].store(false, Ordering::Relaxed);
            idle_since = Instant::now();
            spins = 0;
        } else {
            backoff(&mut spins);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in &self.threads {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Physical cores this process may use: distinct (package, core) pairs in sysfs among the
/// CPUs the scheduler allows, else the available parallelism.
pub fn physical_cores() -> usize {
    let logical = thread::available_parallelism().map_or(1, |n| n.get());
    let read = |cpu: usize, what: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/topology/{what}"))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let mut cores = std::collections::BTreeSet::new();
    for cpu in 0..1024 {
        match (read(cpu, "physical_package_id"), read(cpu, "core_id")) {
            (Some(p), Some(c)) => {
                cores.insert((p, c));
            }
            _ => break,
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads).unwrap();
            for tasks in [0, 1, 5, 64] {
                let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn chunks_and_column_blocks_cover_the_output() {
        let pool = Pool::new(2).unwrap();
        let mut v = vec![0usize; 103];
        pool.for_chunks(&mut v, 10, &|i, part| {
            for (j, x) in part.iter_mut().enumerate() {
                *x = i * 10 + j;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));

        let (rows, stride, width) = (3, 9, 7);
        let mut out = vec![-1.0f32; rows * stride];
        pool.for_column_blocks(
            &mut out,
            rows,
            stride,
            width,
            3,
            (&mut [0u8; 0][..], 0),
            &|c, _| {
                for i in 0..c.rows {
                    let start = c.start;
                    for (j, x) in c.row(i).iter_mut().enumerate() {
                        *x = (i * 100 + start + j) as f32;
                    }
                }
            },
        );
        for i in 0..rows {
            for j in 0..stride {
                let want = if j < width {
                    (i * 100 + j) as f32
                } else {
                    -1.0
                };
                assert_eq!(out[i * stride + j], want);
            }
        }
    }

    #[test]
    fn idle_workers_wake_up() {
        let pool = Pool::new(2).unwrap();
        std::thread::sleep(SPIN * 3);
        let count = AtomicU32::new(0);
        pool.run(8, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
