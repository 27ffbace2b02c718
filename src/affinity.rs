//! Pinning the serving threads to CPUs (`server.pin_workers`, off by default).
//!
//! Why it exists: on a machine where the proxy shares a few CPUs with busy
//! neighbours (the store, its clients), the kernel's balancer can leave two
//! serving threads time-sharing one CPU while the neighbours run on the
//! other: it counts two runnable threads on each and calls that balanced.
//! Each serving thread then waits out the other's scheduler slice, a
//! millisecond or more, with its connections' requests in hand. On 2 CPUs
//! at 16 connections that was fencegate's p99: 1.9 to 3.3 ms with the
//! threads free, 0.48 to 0.58 ms pinned one to a CPU (bench/RESULTS.md,
//! step 16).
//!
//! Why it is off by default: it helps only where the process has its CPUs
//! to itself (an exclusive cpuset, a dedicated host). On a shared host
//! where the process may run on every CPU but has a quota of a few, each
//! pinned process would crowd the same first CPUs. nginx
//! (`worker_cpu_affinity`) and HAProxy (`cpu-map`) leave it off too.
//!
//! A thread started from a pinned serving thread inherits its CPU: tokio's
//! blocking pool for that runtime (a store named by host name is resolved
//! there) runs on the same CPU as the thread that asked.

use core_affinity::CoreId;

/// Why the serving threads cannot be pinned.
#[derive(Debug, thiserror::Error)]
#[error("server.pin_workers: cannot read the CPUs this process may run on: {0}")]
pub struct AffinityError(std::io::Error);

/// The CPU for each of `workers` serving threads: the CPUs this process may
/// run on (its affinity mask, which a container's cpuset narrows), one
/// each, in order; with more workers than CPUs, they share them in turn.
pub fn placement(workers: usize) -> Result<Vec<usize>, AffinityError> {
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        // The mask is read with sched_getaffinity, which sets errno.
        .ok_or_else(|| AffinityError(std::io::Error::last_os_error()))?
        .into_iter()
        .map(|core| core.id)
        .collect();
    if allowed.is_empty() {
        return Err(AffinityError(std::io::Error::other("the affinity mask is empty")));
    }
    Ok(assign(workers, &allowed))
}

/// Worker `i` gets `allowed[i % allowed.len()]`: with more workers than
/// CPUs, they share them evenly.
fn assign(workers: usize, allowed: &[usize]) -> Vec<usize> {
    (0..workers).map(|i| allowed[i % allowed.len()]).collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if core_affinity::set_for_current(CoreId { id: cpu }) {
        return Ok(());
    }
    // sched_setaffinity's errno.
    Err(std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_gets_its_own_cpu_of_those_allowed() {
        // A cpuset of CPUs 2, 3 and 6: the numbers are the mask's, not 0..n.
        assert_eq!(assign(3, &[2, 3, 6]), [2, 3, 6]);
        assert_eq!(assign(2, &[2, 3, 6]), [2, 3]);
    }

    #[test]
    fn workers_beyond_the_cpus_share_them_in_turn() {
        assert_eq!(assign(5, &[0, 1]), [0, 1, 0, 1, 0]);
    }
}
