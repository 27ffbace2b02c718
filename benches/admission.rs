//! Micro-benchmarks of the pure parts of admitting a write: the token
//! header, the path, and the admission rule. Run with
//! `cargo bench --bench admission` (criterion; results in
//! target/criterion/). The hot path is a token equal to the epoch with the
//! leader view agreeing; the other cases show what a refusal or a raise
//! decision costs before any waiting.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use fencegate::fencing::{decide, Access, Leader, Marks};
use fencegate::hop::{Peer, RequestHop};
use fencegate::path::normalize;
use fencegate::token::Token;
use http::{HeaderMap, HeaderName, HeaderValue};

const EPOCH: u64 = 1_234_567;

fn token(v: u64) -> Token {
    Token::new(v).expect("a valid token")
}

/// The hot path's state: no raise pending, the view's leader at the epoch.
fn steady_state() -> (Marks, Leader) {
    let marks = Marks {
        epoch: EPOCH,
        refusal: EPOCH,
    };
    let leader = Leader::View {
        revision: Some(EPOCH),
        confirmed: false,
    };
    (marks, leader)
}

fn bench_decide(c: &mut Criterion) {
    let (marks, leader) = steady_state();
    let mut group = c.benchmark_group("decide");
    group.bench_function("forward (election, token = epoch = leader)", |b| {
        b.iter(|| {
            decide(
                black_box(token(EPOCH)),
                black_box(marks),
                black_box(leader),
                Access::Write,
            )
        })
    });
    group.bench_function("forward (no election)", |b| {
        b.iter(|| {
            decide(
                black_box(token(EPOCH)),
                black_box(marks),
                black_box(Leader::NotElected),
                Access::Write,
            )
        })
    });
    group.bench_function("refuse stale_epoch", |b| {
        b.iter(|| {
            decide(
                black_box(token(EPOCH - 1)),
                black_box(marks),
                black_box(leader),
                Access::Write,
            )
        })
    });
    let next = Leader::View {
        revision: Some(EPOCH + 1),
        confirmed: false,
    };
    group.bench_function("raise (new leader's first write)", |b| {
        b.iter(|| {
            decide(
                black_box(token(EPOCH + 1)),
                black_box(marks),
                black_box(next),
                Access::Write,
            )
        })
    });
    group.finish();
}

fn bench_token(c: &mut Criterion) {
    let mut group = c.benchmark_group("token");
    group.bench_function("parse 7 digits", |b| {
        b.iter(|| Token::parse(black_box(b"1234567")))
    });
    group.bench_function("parse 19 digits", |b| {
        b.iter(|| Token::parse(black_box(b"9223372036854775807")))
    });
    group.bench_function("parse malformed", |b| b.iter(|| Token::parse(black_box(b"0123"))));
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("store.internal"));
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("content-length", HeaderValue::from_static("128"));
    headers.insert("fencing-token", HeaderValue::from_static("1234567"));
    group.bench_function("from_values (one header in a map of 4)", |b| {
        b.iter(|| Token::from_values(black_box(&headers).get_all("fencing-token").iter()))
    });
    group.finish();
}

fn bench_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("path");
    group.bench_function("normalize /bench/obj", |b| {
        b.iter(|| normalize(black_box("/bench/obj")))
    });
    group.bench_function("normalize /orders/2024/11/a%41b/./x", |b| {
        b.iter(|| normalize(black_box("/orders/2024/11/a%41b/./x")))
    });
    group.finish();
}

/// The pure work of one hot-path write, end to end: header, path, rule.
fn bench_admission(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("store.internal"));
    headers.insert("content-length", HeaderValue::from_static("128"));
    headers.insert("fencing-token", HeaderValue::from_static("1234567"));
    let (marks, leader) = steady_state();
    c.bench_function("admission (token + path + decide)", |b| {
        b.iter(|| {
            let token = Token::from_values(black_box(&headers).get_all("fencing-token").iter())
                .expect("valid")
                .expect("present");
            let path = normalize(black_box("/bench/obj")).expect("valid path");
            (
                path,
                decide(token, black_box(marks), black_box(leader), Access::Write),
            )
        })
    });
}

/// A request head whose `Connection` names `names` fields (a client's
/// 64 KiB head holds some 16,000), with 96 other fields, each checked
/// against them: planning it must cost time in proportion to the names
/// (16,000 about 16 × 1,000), not to their square, which once took
/// seconds of a serving thread (bench/RESULTS.md, step 26).
fn bench_hop(c: &mut Criterion) {
    let head = |names: usize| {
        let value: Vec<String> = (0..names).map(|i| format!("n{i:x}")).collect();
        let mut map = HeaderMap::new();
        map.append(
            "connection",
            HeaderValue::from_str(&value.join(",")).expect("a valid value"),
        );
        map.append("host", HeaderValue::from_static("store"));
        for i in 0..96 {
            let name = HeaderName::from_bytes(format!("f{i}").as_bytes()).expect("a valid name");
            map.append(name, HeaderValue::from_static("1"));
        }
        map
    };
    let peer = Peer::new("127.0.0.1:5000".parse().expect("an address"));
    let host = HeaderValue::from_static("store:80");
    let mut group = c.benchmark_group("hop");
    for names in [1_000, 16_000] {
        let map = head(names);
        group.bench_function(format!("a Connection naming {names} fields"), |b| {
            b.iter(|| {
                let hop = RequestHop::new(black_box(&map), &peer);
                hop.fields(&map, &host).count()
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_decide,
    bench_token,
    bench_path,
    bench_admission,
    bench_hop
);
criterion_main!(benches);
