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

/// The allowed CPUs of serving threads 0, 1, ... of `pid` (threads named
/// `fg-worker-N`), and those of its main thread.
fn placement(pid: u32) -> (Vec<Option<Vec<usize>>>, Vec<usize>) {
    let mut workers: Vec<Option<Vec<usize>>> = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = entry.unwrap().file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        if let Some(i) = comm.trim().strip_prefix("fg-worker-") {
            let i: usize = i.parse().unwrap();
            if workers.len() <= i {
                workers.resize(i + 1, None);
            }
            workers[i] = Some(allowed(pid, &tid));
        }
    }
    (workers, allowed(pid, &pid.to_string()))
}

fn put(fg: &Fencegate, path: &str) -> u16 {
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nFencing-Token: 3\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    );
    parse_response(&raw_request(&fg.addr(), request.as_bytes())).status
}

/// Pinned or free cannot be told apart on one CPU.
fn process_cpus_at_least_two(process: &[usize]) {
    assert!(
        process.len() >= 2,
        "this test needs a process that may run on 2 CPUs or more, it may run on {process:?}"
    );
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
    // Pinned threads serve like free ones; the acceptor hands these six
    // connections to the three threads in turn, so each has started.
    for i in 0..6 {
        assert!(matches!(put(&fg, &format!("/d/pinned-{i}")), 201 | 204));
    }
    let pid = fg.pid().expect("running");
    let (_, process) = placement(pid);
    process_cpus_at_least_two(&process);
    // Three workers on the process's CPUs, in order, wrapping round where
    // it has fewer.
    let expected: Vec<Option<Vec<usize>>> = (0..3).map(|i| Some(vec![process[i % process.len()]])).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let workers = loop {
        let (workers, _) = placement(pid);
        if workers == expected || std::time::Instant::now() > deadline {
            break workers;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(workers, expected, "the process may run on {process:?}");
    assert!(
        fg.stderr_text().contains("pinning the serving threads"),
        "the placement is logged:\n{}",
        fg.stderr_text()
    );
}

#[test]
fn serving_threads_are_free_by_default() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(FencegateConfig::new(&nginx.url()).domain("d", "/d/").workers(2));
    for i in 0..4 {
        assert!(matches!(put(&fg, &format!("/d/free-{i}")), 201 | 204));
    }
    let (workers, process) = placement(fg.pid().expect("running"));
    process_cpus_at_least_two(&process);
    assert_eq!(workers.len(), 2, "{workers:?}");
    for cpus in &workers {
        assert_eq!(
            cpus.as_ref(),
            Some(&process),
            "a serving thread was pinned without pin_workers"
        );
    }
    assert!(!fg.stderr_text().contains("pinning the serving threads"));
}
