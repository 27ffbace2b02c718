//! Fuzzing at scale, bounded in time (issue 6): proptest targets for the three
//! parsers that face untrusted or hand-written input: the fencing token, the
//! request path and the configuration file.
//!
//! Each target runs a fixed number of cases chosen so that it takes at most a
//! few seconds in a debug build; `FUZZ_CASES=<n>` overrides that number for
//! every target (e.g. a long nightly run): `FUZZ_CASES=1000000 cargo test --release --test fuzz`.

use std::path::Path;

use fencegate::config::Config;
use fencegate::path::{lies_under, normalize, normalize_prefix, NormalPath};
use fencegate::token::{Token, TokenError};
use proptest::prelude::*;
use proptest::sample::Index;

/// The number of cases of a target: `FUZZ_CASES` if set, else `default`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------- token ----

/// The SPEC's reference: trim optional whitespace (space, tab), then
/// `[1-9][0-9]{0,18}` and at most 9223372036854775807.
fn spec_token(raw: &[u8]) -> Option<u64> {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = raw.iter().position(|b| !is_ows(b))?;
    let end = raw.iter().rposition(|b| !is_ows(b))? + 1;
    let digits = &raw[start..end];
    let shape = (1..=19).contains(&digits.len())
        && (b'1'..=b'9').contains(&digits[0])
        && digits.iter().all(u8::is_ascii_digit);
    if !shape {
        return None;
    }
    // Exact arithmetic in u128 so the reference cannot overflow.
    let value = digits
        .iter()
        .fold(0u128, |acc, d| acc * 10 + u128::from(d - b'0'));
    (value <= i64::MAX as u128).then_some(value as u64)
}

/// Header-value-like bytes: whitespace, digits, signs and near misses.
fn header_like() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        6 => (b'0'..=b'9').prop_map(|b| vec![b]),
        2 => Just(vec![b' ']),
        2 => Just(vec![b'\t']),
        1 => proptest::sample::select(&b"+-.,_xXeE\r\n\x0b\x0c\0"[..]).prop_map(|b| vec![b]),
        1 => Just("\u{0661}".as_bytes().to_vec()),
        1 => Just("\u{ff11}".as_bytes().to_vec()),
        1 => any::<u8>().prop_map(|b| vec![b]),
        1 => (1u64..=Token::MAX).prop_map(|v| v.to_string().into_bytes()),
        1 => proptest::sample::select(&["9223372036854775807", "9223372036854775808", "18446744073709551615",
            "18446744073709551616", "0", "00", "1000000000000000000", "10000000000000000000"][..])
            .prop_map(|s| s.as_bytes().to_vec()),
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

fn check_token(raw: &[u8]) -> Result<(), TestCaseError> {
    let got = Token::parse(raw);
    prop_assert_eq!(got.map(Token::get).ok(), spec_token(raw), "raw = {:?}", raw);
    match got {
        Ok(token) => {
            let v = token.get();
            prop_assert!((1..=Token::MAX).contains(&v));
            prop_assert_eq!(Token::new(v), Some(token));
            // Round trip through the canonical text, with and without OWS.
            let text = token.to_string();
            prop_assert_eq!(Token::parse(text.as_bytes()), Ok(token));
            prop_assert_eq!(Token::parse(format!(" \t{text}\t ").as_bytes()), Ok(token));
            prop_assert_eq!(Some(v), spec_token(text.as_bytes()));
        }
        Err(e) => prop_assert_eq!(e, TokenError::Malformed),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn token_arbitrary_bytes(raw in proptest::collection::vec(any::<u8>(), 0..32)) {
        check_token(&raw)?;
    }

    #[test]
    fn token_header_like(raw in header_like()) {
        check_token(&raw)?;
    }

    #[test]
    fn token_header_values(
        values in proptest::collection::vec(header_like(), 0..4),
    ) {
        // Only what `http` accepts as a header value reaches `from_values`.
        let values: Vec<http::HeaderValue> =
            values.iter().filter_map(|v| http::HeaderValue::from_bytes(v).ok()).collect();
        let got = Token::from_values(values.iter());
        match values.len() {
            0 => prop_assert_eq!(got, Ok(None)),
            1 => prop_assert_eq!(got, Token::parse(values[0].as_bytes()).map(Some)),
            _ => prop_assert_eq!(got, Err(TokenError::Repeated)),
        }
    }

    #[test]
    fn token_two_values_always_refused(a in header_like(), b in header_like()) {
        let a = http::HeaderValue::from_bytes(&a);
        let b = http::HeaderValue::from_bytes(&b);
        if let (Ok(a), Ok(b)) = (a, b) {
            prop_assert_eq!(Token::from_values([&a, &b].into_iter()), Err(TokenError::Repeated));
            prop_assert_eq!(Token::from_values([&a, &a].into_iter()), Err(TokenError::Repeated));
        }
    }
}

// ----------------------------------------------------------------- path ----

/// URL-ish pieces, biased toward what path normalization must get right.
fn path_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("/".to_owned()),
        4 => Just(".".to_owned()),
        2 => Just("..".to_owned()),
        4 => Just("%".to_owned()),
        4 => "[0-9a-fA-F]".prop_map(String::from),
        2 => "[a-z]{1,3}".prop_map(String::from),
        2 => "%[0-9a-fA-F]{2}".prop_map(String::from),
        1 => proptest::sample::select(&["%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%00", "%7f", "%25",
            "%41", "%7E", "%c3%a9"][..]).prop_map(String::from),
        2 => Just(";".to_owned()),
        2 => Just("\\".to_owned()),
        1 => proptest::sample::select(&["?", "#", "~", "-", "_", " ", "\t", "\0", "\x7f", "é", "\u{2215}"][..])
            .prop_map(String::from),
        1 => any::<char>().prop_map(String::from),
    ]
}

fn urlish() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::collection::vec(path_piece(), 0..24).prop_map(|p| format!("/{}", p.concat())),
        1 => proptest::collection::vec(path_piece(), 0..24).prop_map(|p| p.concat()),
        1 => any::<String>(),
        1 => any::<String>().prop_map(|s| format!("/{s}")),
        1 => proptest::collection::vec(any::<u8>(), 0..32)
            .prop_map(|b| format!("/{}", String::from_utf8_lossy(&b))),
    ]
}

/// RFC 3986's `pchar` but `;` (unreserved, sub-delims, `:` and `@`).
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b)
}

/// Everything a normal form must be, whatever it came from.
fn check_normal_form(s: &str) -> Result<(), TestCaseError> {
    prop_assert!(s.starts_with('/'), "{:?}", s);
    prop_assert!(!s.contains("//"), "{:?}", s);
    prop_assert!(s.split('/').all(|seg| seg != "." && seg != ".."), "{:?}", s);
    prop_assert!(!s.contains('\\') && !s.contains(';'), "{:?}", s);
    prop_assert!(
        s.bytes().all(|b| b.is_ascii() && !b.is_ascii_control()),
        "{:?}",
        s
    );
    // Every byte has one spelling: raw only the characters a path may hold
    // raw (RFC 3986's `pchar` but `;`), and every escape canonical (two
    // upper-case hex digits), never an encoded `/`, `\`, control byte or
    // character that may stand raw (a store decodes `%40` to `@`).
    prop_assert!(
        s.bytes().all(|b| b == b'/' || b == b'%' || is_pchar(b)),
        "a raw byte that must be escaped in {:?}",
        s
    );
    let b = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        let hex = b.get(i + 1..i + 3);
        prop_assert!(
            hex.is_some_and(|h| h.iter().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))),
            "{:?}",
            s
        );
        let value = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap();
        prop_assert!(value != b'/' && value != b'\\', "encoded separator in {:?}", s);
        prop_assert!(value >= 0x20 && value != 0x7F, "encoded control byte in {:?}", s);
        prop_assert!(!is_pchar(value), "an encoded byte that stands raw in {:?}", s);
    }
    Ok(())
}

/// Segment-wise reference for `lies_under`: the path's segments (ignoring a
/// trailing empty one) start with the prefix's segments.
fn segment_prefix(path: &str, prefix: &str) -> bool {
    let segs =
        |s: &str| -> Vec<String> { s.split('/').filter(|x| !x.is_empty()).map(String::from).collect() };
    let (p, q) = (segs(path), segs(prefix));
    p.len() >= q.len() && p[..q.len()] == q[..]
}

/// Paths and prefixes over a tiny alphabet so that they often share segments.
fn small_path() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        4 => proptest::sample::select(&["a", "b", "ab", "a.b", "%61", "b%2E"][..]),
        1 => Just("."),
        1 => Just(".."),
        1 => Just(""),
    ];
    (proptest::collection::vec(seg, 0..6), any::<bool>())
        .prop_map(|(s, slash)| format!("/{}{}", s.join("/"), if slash { "/" } else { "" }))
}

proptest! {
    #![proptest_config(config(8_000))]

    #[test]
    fn path_normalize(raw in urlish()) {
        if let Ok(once) = normalize(&raw) {
            check_normal_form(once.as_str())?;
            let twice = normalize(once.as_str());
            prop_assert_eq!(twice.as_ref(), Ok(&once), "raw = {:?}", raw);
        }
    }

    #[test]
    fn path_normalize_prefix(raw in urlish()) {
        let path = normalize(&raw);
        let prefix = normalize_prefix(&raw);
        prop_assert_eq!(path.is_ok(), prefix.is_ok());
        if let (Ok(path), Ok(prefix)) = (path, prefix) {
            check_normal_form(&prefix)?;
            prop_assert!(prefix.ends_with('/'));
            prop_assert_eq!(prefix.trim_end_matches('/'), path.as_str().trim_end_matches('/'));
            prop_assert_eq!(normalize_prefix(&prefix), Ok(prefix.clone()));
            prop_assert!(lies_under(&path, &prefix), "{} not under its own prefix {}", path, prefix);
        }
    }

}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn path_lies_under_is_segment_wise(raw_path in small_path(), raw_prefix in small_path()) {
        if let (Ok(path), Ok(prefix)) = (normalize(&raw_path), normalize_prefix(&raw_prefix)) {
            let want = segment_prefix(path.as_str(), &prefix);
            prop_assert_eq!(lies_under(&path, &prefix), want, "path {} prefix {}", path, prefix);
        }
    }

}

proptest! {
    #![proptest_config(config(5_000))]

    #[test]
    fn path_lies_under_arbitrary(raw_path in urlish(), raw_prefix in urlish()) {
        if let (Ok(path), Ok(prefix)) = (normalize(&raw_path), normalize_prefix(&raw_prefix)) {
            let want = segment_prefix(path.as_str(), &prefix);
            prop_assert_eq!(lies_under(&path, &prefix), want, "path {} prefix {}", path, prefix);
        }
    }
}

// --------------------------------------------------------------- config ----

const CONFIG_FILE: &str = "fuzz/mutated-fencegate.toml";

fn example_config() -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fencegate.toml");
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(Index),
    DuplicateLine(Index, Index),
    SwapValues(Index, Index),
    Uncomment(Index),
    InsertChar(Index, Index, char),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let ch = prop_oneof![
        4 => proptest::sample::select(&['\n', '"', '\'', '[', ']', '=', '#', '/', '.', ',', ' ', '0', '9', '-',
            ':', '\\', '\0', '{', '}', 'é'][..]),
        1 => any::<char>(),
    ];
    prop_oneof![
        3 => any::<Index>().prop_map(Mutation::DeleteLine),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::DuplicateLine(a, b)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapValues(a, b)),
        2 => any::<Index>().prop_map(Mutation::Uncomment),
        3 => (any::<Index>(), any::<Index>(), ch).prop_map(|(a, p, c)| Mutation::InsertChar(a, p, c)),
    ]
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for m in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        match m {
            Mutation::DeleteLine(i) => {
                lines.remove(i.index(lines.len()));
            }
            Mutation::DuplicateLine(from, to) => {
                let line = lines[from.index(lines.len())].clone();
                let at = to.index(lines.len() + 1);
                lines.insert(at, line);
            }
            Mutation::SwapValues(a, b) => {
                let assignments: Vec<usize> =
                    (0..lines.len()).filter(|&i| lines[i].contains(" = ")).collect();
                if !assignments.is_empty() {
                    let (a, b) = (
                        assignments[a.index(assignments.len())],
                        assignments[b.index(assignments.len())],
                    );
                    let split = |l: &str| {
                        let (k, v) = l.split_once(" = ").unwrap();
                        (k.to_owned(), v.to_owned())
                    };
                    let ((ka, va), (kb, vb)) = (split(&lines[a]), split(&lines[b]));
                    lines[a] = format!("{ka} = {vb}");
                    lines[b] = format!("{kb} = {va}");
                }
            }
            Mutation::Uncomment(i) => {
                let i = i.index(lines.len());
                let line = &lines[i];
                lines[i] = line
                    .strip_prefix("# ")
                    .or_else(|| line.strip_prefix('#'))
                    .unwrap_or(line)
                    .to_owned();
            }
            Mutation::InsertChar(i, pos, c) => {
                let i = i.index(lines.len());
                let line = &mut lines[i];
                let mut at = pos.index(line.len() + 1);
                while !line.is_char_boundary(at) {
                    at -= 1;
                }
                line.insert(at, *c);
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

#[test]
fn example_config_is_valid() {
    let config = Config::parse(&example_config(), Path::new(CONFIG_FILE)).expect("the example is valid");
    assert_eq!(config.domains[0].prefix, "/orders/");
}

proptest! {
    #![proptest_config(config(12_000))]

    #[test]
    fn config_mutations(mutations in proptest::collection::vec(mutation(), 1..8)) {
        let text = apply(&example_config(), &mutations);
        match Config::parse(&text, Path::new(CONFIG_FILE)) {
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.contains(CONFIG_FILE), "{} does not name the file\n{}", message, text);
            }
            Ok(config) => {
                let mut seen = std::collections::HashSet::new();
                for domain in &config.domains {
                    let prefix = &domain.prefix;
                    prop_assert!(prefix.starts_with('/') && prefix.ends_with('/'), "{:?}", prefix);
                    check_normal_form(prefix)?;
                    prop_assert_eq!(normalize_prefix(prefix), Ok(prefix.clone()));
                    prop_assert!(seen.insert(prefix.clone()), "{:?} twice", prefix);
                    let as_path: NormalPath = normalize(prefix).unwrap();
                    prop_assert!(lies_under(&as_path, prefix));
                }
            }
        }
    }
}
