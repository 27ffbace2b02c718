//! `server.pin_workers`: each serving thread runs on one CPU of those the
//! process may use, in order, and the proxy serves as before. Without it
//! (the default) the serving threads may run wherever the process may.

use crate::support::{parse_response, raw_request, Fencegate, FencegateConfig, Nginx};

/// The CPUs in a `Cpus_allowed_list` ("0-2,5").
fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// The CPUs a thread of `pid` may run on, from `/proc`.
fn allowed(pid: u32, tid: &str) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc status");
    parse_cpu_list(line)
}

/// The allowed CPUs of each serving thread of `pid`, in thread-id order
/// (the order they were started in), and those of its main thread.
fn placement(pid: u32) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    tids.sort_unstable();
    let workers = tids
        .iter()
        .filter(|tid| {
            // Thread names are cut to 15 bytes: "fencegate-worker-0" reads "fencegate-worke".
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            comm.trim() == "fencegate-worke"
        })
        .map(|tid| allowed(pid, &tid.to_string()))
        .collect();
    (workers, allowed(pid, &pid.to_string()))
}

fn put(fg: &Fencegate, path: &str) -> u16 {
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nFencing-Token: 3\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    );
    parse_response(&raw_request(&fg.addr(), request.as_bytes())).status
}

#[test]
fn pinned_serving_threads_each_run_on_one_allowed_cpu_in_order() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(
        FencegateConfig::new(&nginx.url())
            .domain("d", "/d/")
            .workers(3)
            .pin_workers(true),
    );
    let (workers, process) = placement(fg.pid().expect("running"));
    assert_eq!(workers.len(), 3, "three serving threads: {workers:?}");
    // Three workers on the process's CPUs, wrapping round where it has fewer.
    let expected: Vec<Vec<usize>> = (0..3).map(|i| vec![process[i % process.len()]]).collect();
    assert_eq!(workers, expected, "the process may run on {process:?}");
    assert!(
        fg.stderr_text().contains("pinning the serving threads"),
        "the placement is logged:\n{}",
        fg.stderr_text()
    );
    // Pinned threads serve like free ones.
    for i in 0..6 {
        assert!(matches!(put(&fg, &format!("/d/pinned-{i}")), 201 | 204));
    }
}

#[test]
fn serving_threads_are_free_by_default() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(FencegateConfig::new(&nginx.url()).domain("d", "/d/").workers(2));
    let (workers, process) = placement(fg.pid().expect("running"));
    assert_eq!(workers.len(), 2, "{workers:?}");
    for cpus in &workers {
        assert_eq!(cpus, &process, "a serving thread was pinned without pin_workers");
    }
    assert!(!fg.stderr_text().contains("pinning the serving threads"));
}
