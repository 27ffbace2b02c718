//! The durability promise under repeated crashes (SPEC.md: epoch, State
//! file): no admitted epoch is ever forgotten. fencegate in front of a real
//! nginx store is SIGKILLed at random moments while concurrent raises are
//! in flight; after each crash the durable epoch must cover every token the
//! store acknowledged, and it never goes down.

use crate::support::{Fencegate, FencegateConfig, Nginx};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const KILLS: u32 = 100;
/// The loop stops early (and says how far it got) past this.
const LOOP_BUDGET: Duration = Duration::from_secs(60);
const WRITERS: usize = 4;
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
const SEED: u64 = 0x5eed_fe9c_e0a7_e001;

/// xorshift64*: a fixed seed makes every run kill at the same offsets.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How one PUT ended, seen by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A status line arrived.
    Status(u16),
    /// No status line: connect refused, reset or EOF (the kill).
    Cut,
}

/// `PUT path` with `token` on a fresh connection. Never panics: the proxy
/// may die at any moment.
fn put(addr: SocketAddr, path: &str, token: u64) -> Outcome {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return Outcome::Cut;
    };
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: store\r\nFencing-Token: {token}\r\n\
         Content-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    if stream.write_all(req.as_bytes()).is_err() {
        return Outcome::Cut;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Outcome::Cut,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line from fencegate: {line:?}"));
    Outcome::Status(status)
}

fn admin_epoch(fg: &Fencegate) -> u64 {
    let resp = fg.admin_get("/domains");
    assert_eq!(resp.status, 200, "/domains: {resp:?}");
    let list: Value = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("/domains is not JSON ({e}): {}", resp.body));
    list.as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == "orders"))
        .and_then(|d| d["epoch"].as_u64())
        .unwrap_or_else(|| panic!("no numeric epoch for `orders` in {}", resp.body))
}

#[test]
fn sigkill_during_concurrent_raises_never_forgets_an_acknowledged_token() {
    let nginx = Nginx::start();
    let config = FencegateConfig::new(&nginx.url())
        .domain("orders", "/orders/")
        .request_timeout(REQUEST_TIMEOUT);
    let mut fg = Fencegate::init_only(config);
    let addr: SocketAddr = fg.addr().parse().expect("listen address");
    let mut rng = XorShift(SEED);
    let next_token = AtomicU64::new(1);

    let mut epoch = fg.durable_epoch("orders");
    assert_eq!(epoch, 0, "a fresh state file starts at epoch 0");
    // Every token sent, with the iteration it was sent in and its outcome.
    let mut sent: Vec<(u64, u32, Outcome)> = Vec::new();
    // The durable epoch read after each iteration's kill.
    let mut epoch_after: Vec<u64> = Vec::new();
    let mut kills = 0u32;
    let mut iterations_with_2xx = 0u32;
    let mut iterations_with_cut = 0u32;
    let loop_started = Instant::now();

    while kills < KILLS && loop_started.elapsed() < LOOP_BUDGET {
        // Two kills in three land after the crash wait (raises commit and
        // reach the store); the others mostly during it (raises begun,
        // waiting, never acknowledged).
        let after_crash_wait = rng.below(3) != 0;
        let delay = Duration::from_millis(rng.below(31));

        let spawned = Instant::now();
        fg.start_again();
        if after_crash_wait {
            let wait = (REQUEST_TIMEOUT + Duration::from_millis(20)).saturating_sub(spawned.elapsed());
            std::thread::sleep(wait);
        }

        let stop = AtomicBool::new(false);
        let outcomes: Mutex<Vec<(u64, Outcome)>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let (stop, outcomes, next_token) = (&stop, &outcomes, &next_token);
                let mut rng = XorShift(SEED ^ (u64::from(kills) << 8 | w as u64).wrapping_mul(0x9e37_79b9));
                s.spawn(move || {
                    let path = format!("/orders/w{w}");
                    while !stop.load(Ordering::SeqCst) {
                        // One write in four raises (a token above any sent
                        // before); the others reuse the highest token sent,
                        // so some are admitted at the epoch while raises
                        // keep superseding each other.
                        let highest = next_token.load(Ordering::SeqCst) - 1;
                        let token = if highest == 0 || rng.below(4) == 0 {
                            next_token.fetch_add(1, Ordering::SeqCst)
                        } else {
                            highest
                        };
                        let outcome = put(addr, &path, token);
                        outcomes.lock().unwrap().push((token, outcome));
                        if outcome == Outcome::Cut {
                            break;
                        }
                    }
                });
            }
            std::thread::sleep(delay);
            fg.kill9();
            stop.store(true, Ordering::SeqCst);
        });
        kills += 1;

        let outcomes = outcomes.into_inner().unwrap();
        let max_2xx = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Status(200..=299)))
            .map(|&(t, _)| t)
            .max();
        iterations_with_2xx += u32::from(max_2xx.is_some());
        iterations_with_cut += u32::from(outcomes.iter().any(|(_, o)| *o == Outcome::Cut));

        let now = fg.durable_epoch("orders");
        assert!(
            now >= epoch,
            "kill {kills}: the durable epoch went down from {epoch} to {now}"
        );
        if let Some(max_2xx) = max_2xx {
            assert!(
                now >= max_2xx,
                "kill {kills} ({delay:?} into the burst, after crash wait: {after_crash_wait}): \
                 token {max_2xx} got a 2xx but the durable epoch after SIGKILL is {now}\n\
                 outcomes: {outcomes:?}"
            );
        }
        let sent_max = next_token.load(Ordering::SeqCst) - 1;
        assert!(
            now <= sent_max,
            "kill {kills}: epoch {now} above every token sent ({sent_max})"
        );
        epoch = now;
        epoch_after.push(now);
        sent.extend(outcomes.into_iter().map(|(t, o)| (t, kills, o)));
    }
    let loop_took = loop_started.elapsed();

    // The running proxy agrees with the file, and refuses below it.
    fg.start_again();
    assert_eq!(admin_epoch(&fg), epoch, "/domains after the last restart");
    if epoch > 1 {
        assert_eq!(
            put(addr, "/orders/final", epoch - 1),
            Outcome::Status(412),
            "token {} below the epoch {epoch} after the last restart",
            epoch - 1
        );
    }
    fg.kill9();

    // The store's side: every write nginx applied was admitted by a run it
    // was sent to, so it is covered by the epoch read after the kill of the
    // last run it was sent to
    // (a late in-flight write may land after a newer raise: that ordering
    // is the documented request_timeout exception and not checked here).
    // A token reused across iterations: the last one it was sent in (the
    // epoch never goes down, so that bound covers every earlier one too).
    let mut iteration_of: HashMap<u64, u32> = HashMap::new();
    for &(t, i, _) in &sent {
        iteration_of.insert(t, i);
    }
    let mut store_2xx = 0u64;
    for entry in nginx.log_entries() {
        let Some(token) = entry.token.as_deref().and_then(|t| t.parse::<u64>().ok()) else {
            continue;
        };
        let i = *iteration_of
            .get(&token)
            .unwrap_or_else(|| panic!("nginx logged token {token} that the test never sent: {entry:?}"));
        let covered = epoch_after[(i - 1) as usize];
        assert!(
            token <= covered,
            "nginx applied token {token} (last sent in iteration {i}) but the durable epoch after that \
             iteration's kill was {covered}: {entry:?}"
        );
        store_2xx += u64::from((200..300).contains(&entry.status));
    }

    let mut by_outcome: HashMap<String, u64> = HashMap::new();
    for (_, _, o) in &sent {
        let key = match o {
            Outcome::Status(s) => s.to_string(),
            Outcome::Cut => "cut".to_string(),
        };
        *by_outcome.entry(key).or_default() += 1;
    }
    let acknowledged = sent
        .iter()
        .filter(|(_, _, o)| matches!(o, Outcome::Status(200..=299)))
        .count();
    let mut outcomes: Vec<_> = by_outcome.into_iter().collect();
    outcomes.sort();
    println!(
        "crash_loop: N = {kills} kills in {loop_took:?}; writes sent {}, 2xx {acknowledged} \
         (store logged {store_2xx} 2xx), outcomes {outcomes:?}; iterations with a 2xx before the \
         kill {iterations_with_2xx}, with a write cut by the kill {iterations_with_cut}; max epoch {epoch}",
        sent.len()
    );
    // Not vacuous: kills must have landed both after acknowledged raises
    // and on writes in flight.
    assert!(kills >= 20, "only {kills} kills fit in {LOOP_BUDGET:?}");
    assert!(
        iterations_with_2xx >= kills / 4,
        "only {iterations_with_2xx} of {kills} iterations had a 2xx before the kill"
    );
    assert!(
        iterations_with_cut >= kills / 4,
        "only {iterations_with_cut} of {kills} kills cut a write in flight"
    );
}
