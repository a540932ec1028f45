//! [`Guarded`]: one plugin instance kept across calls, each call under its
//! limits, a trap or a wrong answer counted as a fault, the instance
//! rebuilt after a trap (rate-limited), the plugin disabled after too many
//! faults in a row, and a slow plugin's calls handing the worker over; with
//! its settings ([`GuardSettings`]) and counters ([`PluginStats`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};
use wasmtime::{Engine, Store};

use thiserror::Error;

use super::host::HostState;
use super::limits::Limits;
use super::{PluginError, TICK};

/// Counters of one plugin.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Messages (or checks) handed to the plugin; a batch counts each.
    pub calls: AtomicU64,
    /// `process-batch` calls that answered.
    pub batches: AtomicU64,
    /// Batches that trapped or overran, replayed message by message.
    pub batch_replays: AtomicU64,
    pub messages_out: AtomicU64,
    pub faults: AtomicU64,
    pub restarts: AtomicU64,
    pub disabled: AtomicBool,
    /// Time spent inside the plugin, all calls together (ns).
    pub busy_ns: AtomicU64,
    /// Why it last faulted (for the status page and `status`).
    pub last_fault: Mutex<Option<String>>,
}

impl PluginStats {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "calls": self.calls.load(Ordering::Relaxed),
            "batches": self.batches.load(Ordering::Relaxed),
            "batch_replays": self.batch_replays.load(Ordering::Relaxed),
            "messages_out": self.messages_out.load(Ordering::Relaxed),
            "faults": self.faults.load(Ordering::Relaxed),
            "restarts": self.restarts.load(Ordering::Relaxed),
            "disabled": self.disabled.load(Ordering::Relaxed),
            "busy_ns": self.busy_ns.load(Ordering::Relaxed),
            "last_fault": *self.last_fault.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }
}

/// Why a call into a plugin gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Fault {
    /// Not entered: disabled, or its instance not (yet) rebuilt.
    #[error("{0}")]
    NotEntered(String),
    /// Entered, and it trapped. `overran`: past its deadline or out of
    /// fuel (a batch's replay pays for that again: batching should pause).
    #[error("{why}")]
    Trapped { why: String, overran: bool },
}

impl Fault {
    pub fn trapped(&self) -> bool {
        matches!(self, Fault::Trapped { .. })
    }

    pub fn overran(&self) -> bool {
        matches!(self, Fault::Trapped { overran: true, .. })
    }
}

/// For callers that report failures as text.
impl From<Fault> for String {
    fn from(f: Fault) -> String {
        f.to_string()
    }
}

/// How one plugin instance is guarded.
#[derive(Clone)]
pub struct GuardSettings {
    pub name: String,
    pub limits: Limits,
    pub params: Vec<(String, String)>,
    /// Environment variables granted to the plugin (none by default).
    pub env: Vec<(String, String)>,
    /// Faults in a row before the plugin is disabled.
    pub max_faults: u32,
}

/// Instantiates a plugin in a fresh store and calls its `init`.
pub type Instantiate<P> = Box<dyn Fn(&mut Store<HostState>) -> Result<P, String> + Send + Sync>;

/// How long instantiation and `init` may take when a plugin is loaded or
/// reloaded (off the message path), in ticks, when its per-call
/// `timeout_ms` is shorter. A 20 ms budget there failed gateway starts and
/// reloads on a loaded machine (two busy cores deschedule the loading
/// thread); a plugin whose `init` never returns is still stopped.
const LOAD_TICKS: u64 = 2000 / TICK.as_millis() as u64;

/// One plugin instance, kept across calls (its memory is the plugin's
/// state), each call under the memory limit, the epoch deadline and the
/// fuel budget. After a trap the instance cannot be entered again: it is
/// rebuilt (at most every 100 ms) from its pre-instantiated form, `init`
/// included. After `max_faults` faults in a row the plugin is disabled
/// until it is reloaded.
pub struct Guarded<P> {
    pub name: Arc<str>,
    engine: Engine,
    settings: GuardSettings,
    instantiate: Instantiate<P>,
    live: Mutex<Live<P>>,
    /// Faults in a row (outside the lock: a success only resets it).
    consecutive: AtomicU32,
    pub stats: Arc<PluginStats>,
    /// A call took SLOW_CALL or more (until FAST_AGAIN fast ones in a row).
    slow: AtomicBool,
    fast_calls: AtomicU32,
}

/// A call this long marks the plugin slow; this many faster ones in a row
/// clear it.
const SLOW_CALL: Duration = Duration::from_millis(1);
const FAST_AGAIN: u32 = 1000;

/// Whether this thread may hand its worker over (`block_in_place`): on the
/// gateway's multi-threaded runtime, not on a current-thread one (tests,
/// `plugin run`), where it would panic.
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

struct Live<P> {
    instance: Option<(Store<HostState>, P)>,
    next_restart: Option<Instant>,
    /// When the instance was last rebuilt (the last few times).
    restarts: std::collections::VecDeque<Instant>,
    /// A batch killed it: the rebuild for its replay is not rate-limited
    /// (the culprit's own fault in the replay is).
    replaying: bool,
}

/// After [`RESTART_BURST`] rebuilds within a second, the next waits this
/// long (a plugin that traps on every call must not be rebuilt at message
/// rate); until then a killed instance is rebuilt at once.
const RESTART_EVERY: Duration = Duration::from_millis(100);
const RESTART_BURST: usize = 3;

impl<P> Guarded<P> {
    /// Instantiates once now: a plugin that cannot start says why before it
    /// takes any message.
    pub fn new(
        engine: &Engine,
        settings: GuardSettings,
        instantiate: Instantiate<P>,
    ) -> Result<Self, PluginError> {
        let g = Guarded {
            name: Arc::from(settings.name.as_str()),
            engine: engine.clone(),
            settings,
            instantiate,
            live: Mutex::new(Live {
                instance: None,
                next_restart: None,
                restarts: std::collections::VecDeque::new(),
                replaying: false,
            }),
            consecutive: AtomicU32::new(0),
            stats: Arc::new(PluginStats::default()),
            slow: AtomicBool::new(false),
            fast_calls: AtomicU32::new(0),
        };
        // Off the message path (start, reload): time to instantiate and
        // init even on a busy machine.
        let budget = g.settings.limits.deadline_ticks.max(LOAD_TICKS);
        let first = g.fresh(budget).map_err(|reason| PluginError::Init {
            name: g.settings.name.clone(),
            reason,
        })?;
        g.live.lock().unwrap_or_else(|e| e.into_inner()).instance = Some(first);
        Ok(g)
    }

    pub fn disabled(&self) -> bool {
        self.stats.disabled.load(Ordering::Relaxed)
    }

    /// A new instance; instantiating it (and the plugin's `init`) may run
    /// for `deadline_ticks`.
    fn fresh(&self, deadline_ticks: u64) -> Result<(Store<HostState>, P), String> {
        let mut store = Store::new(
            &self.engine,
            HostState::new(
                self.name.clone(),
                self.settings.params.clone(),
                &self.settings.env,
                &self.settings.limits,
            ),
        );
        store.limiter(|s| &mut s.limits);
        self.arm(&mut store);
        store.set_epoch_deadline(deadline_ticks);
        let p = (self.instantiate)(&mut store)?;
        Ok((store, p))
    }

    fn arm(&self, store: &mut Store<HostState>) {
        store.set_epoch_deadline(self.settings.limits.deadline_ticks);
        if let Some(fuel) = self.settings.limits.fuel {
            let _ = store.set_fuel(fuel);
        }
    }

    /// Calls into the instance (rebuilding it first if a trap killed it).
    /// A trap is a fault; the call's own result is the caller's to judge
    /// (then [`Guarded::succeeded`] or [`Guarded::failed`]).
    pub fn call<R>(
        &self,
        f: impl FnOnce(&P, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.enter(true, f)
    }

    /// [`Guarded::call`] for a batch of `messages`, each counted as a call
    /// once it returned. A trap is no fault here: the caller replays the
    /// batch message by message, and the culprit faults then.
    pub fn call_batch<R>(
        &self,
        messages: u64,
        f: impl FnOnce(&P, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        match self.enter(false, f) {
            Ok(r) => {
                self.stats.calls.fetch_add(messages, Ordering::Relaxed);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                Ok(r)
            }
            Err(fault) => {
                if fault.trapped() {
                    self.stats.batch_replays.fetch_add(1, Ordering::Relaxed);
                }
                Err(fault)
            }
        }
    }

    /// The call, or why not; `faults`: a failure counts towards disabling.
    fn enter<R>(
        &self,
        faults: bool,
        f: impl FnOnce(&P, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        let mut live = self.lock_live();
        if live.instance.is_none() {
            if self.disabled() {
                return Err(Fault::NotEntered("disabled after repeated faults".into()));
            }
            if live.next_restart.is_some_and(|t| Instant::now() < t) {
                let why = "instance not restarted yet after a fault".to_string();
                return Err(Fault::NotEntered(if faults {
                    self.fault(&mut live, why)
                } else {
                    why
                }));
            }
            // A restart on the message path: the call's own budget.
            match self.fresh(self.settings.limits.deadline_ticks) {
                Ok(i) => {
                    self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                    live.instance = Some(i);
                    if !std::mem::take(&mut live.replaying) {
                        let now = Instant::now();
                        live.restarts.push_back(now);
                        while live.restarts.len() > RESTART_BURST {
                            live.restarts.pop_front();
                        }
                    }
                }
                Err(e) => {
                    live.next_restart = Some(Instant::now() + RESTART_EVERY);
                    return Err(Fault::NotEntered(if faults {
                        self.fault(&mut live, e)
                    } else {
                        e
                    }));
                }
            }
        }
        let (store, plugin) = live.instance.as_mut().expect("instantiated above");
        self.arm(store);
        let slow = self.slow.load(Ordering::Relaxed);
        let started = Instant::now();
        // A plugin known to be slow (a call took over SLOW_CALL) is called
        // as blocking code: this worker hands its other connections (and
        // the runtime's I/O) to another thread for the call's duration.
        let result = if slow && on_multi_thread_runtime() {
            tokio::task::block_in_place(|| f(plugin, store))
        } else {
            f(plugin, store)
        };
        let took = started.elapsed();
        self.stats
            .busy_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        if took >= SLOW_CALL {
            self.fast_calls.store(0, Ordering::Relaxed);
            if !slow {
                self.slow.store(true, Ordering::Relaxed);
                debug!(plugin = %self.name, took_us = took.as_micros() as u64, "slow plugin call: its calls now hand the worker over");
            }
        } else if slow && self.fast_calls.fetch_add(1, Ordering::Relaxed) + 1 >= FAST_AGAIN {
            self.slow.store(false, Ordering::Relaxed);
        }
        match result {
            Ok(r) => Ok(r),
            Err(trap) => {
                live.instance = None;
                let burst = faults
                    && live.restarts.len() >= RESTART_BURST
                    && live
                        .restarts
                        .front()
                        .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
                live.next_restart = burst.then(|| Instant::now() + RESTART_EVERY);
                live.replaying = !faults;
                let (why, overran) = match trap.downcast_ref::<wasmtime::Trap>() {
                    Some(wasmtime::Trap::Interrupt) => (
                        format!(
                            "ran past its deadline ({} ms)",
                            self.settings.limits.deadline_ticks.saturating_sub(1)
                        ),
                        true,
                    ),
                    Some(wasmtime::Trap::OutOfFuel) => ("ran out of fuel".to_string(), true),
                    _ => (format!("trapped: {trap:#}"), false),
                };
                Err(Fault::Trapped {
                    why: if faults {
                        self.fault(&mut live, why)
                    } else {
                        why
                    },
                    overran,
                })
            }
        }
    }

    /// The instance, waited for by spinning a little first: another thread
    /// holds it for one call (about a microsecond), far less than parking
    /// this thread and waking it again costs.
    fn lock_live(&self) -> std::sync::MutexGuard<'_, Live<P>> {
        // The clock is read only once the lock was found busy.
        let mut spin_until = None;
        loop {
            for _ in 0..64 {
                match self.live.try_lock() {
                    Ok(g) => return g,
                    Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => std::hint::spin_loop(),
                }
            }
            let now = Instant::now();
            if now >= *spin_until.get_or_insert(now + Duration::from_micros(50)) {
                // Still busy: a slow or looping call (up to its deadline).
                // On the gateway's multi-threaded runtime this worker hands
                // its other connections to a fresh thread while it waits,
                // so a plugin stuck on two workers does not stall the
                // broker's other topics.
                let wait = || self.live.lock().unwrap_or_else(|e| e.into_inner());
                return if on_multi_thread_runtime() {
                    tokio::task::block_in_place(wait)
                } else {
                    wait()
                };
            }
        }
    }

    /// A call that did right: the fault streak ends (no lock taken: this is
    /// every message's path).
    pub fn succeeded(&self, messages_out: usize) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.stats
            .messages_out
            .fetch_add(messages_out as u64, Ordering::Relaxed);
    }

    /// A call that returned but did wrong (an error, garbage): a fault.
    pub fn failed(&self, why: String) -> String {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        self.fault(&mut live, why)
    }

    fn fault(&self, live: &mut Live<P>, why: String) -> String {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .last_fault
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if consecutive >= self.settings.max_faults && !self.disabled() {
            self.stats.disabled.store(true, Ordering::Relaxed);
            live.instance = None;
            error!(plugin = %self.name, faults = consecutive, error = %why, "plugin disabled after repeated faults (a reload enables it again)");
        } else {
            warn!(plugin = %self.name, error = %why, "plugin fault");
        }
        why
    }
}
