//! Path normalization: the path that is checked against the domains is the
//! path that is forwarded, so a write cannot reach one part of the store
//! while being judged as another.
//!
//! The normal form percent-decodes unreserved characters, upper-cases the
//! hex of every other escape, removes dot segments and collapses repeated
//! slashes. Anything a store could read as a different path than we do is
//! refused instead: encoded `/` or `\`, raw `\`, `;` (path parameters),
//! control bytes, raw non-ASCII, broken escapes and `..` above the root.
//!
//! Every byte has one spelling in the normal form. A store that decodes
//! every escape (nginx does, in the path and in `Destination`) reads `%40`
//! and `@` as the same file, so a prefix holding `@` must match both: the
//! characters a path may hold raw (RFC 3986's `pchar`: unreserved,
//! sub-delims but `;`, `:` and `@`) are decoded, and every other byte is
//! escaped, raw or not (`|`, `"`, `{`, a space in a configured prefix).

use std::fmt;

/// Why a path was refused with 400 `bad_path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path.
    #[error("the path must start with `/`")]
    NotAbsolute,
    /// `%2F` or `%5C`: a store may decode it into a separator.
    #[error("the path contains an encoded `/` or `\\`")]
    EncodedSeparator,
    /// A raw `\`, which some stores treat as a separator.
    #[error("the path contains a `\\`")]
    Backslash,
    /// A `;`, which some stores strip as a path parameter.
    #[error("the path contains a `;`")]
    Semicolon,
    /// NUL, another control byte or DEL, raw or encoded.
    #[error("the path contains a control byte")]
    ControlByte,
    /// A raw byte above 0x7F (must be percent-encoded).
    #[error("the path contains a raw non-ASCII byte")]
    NonAscii,
    /// `%` not followed by two hex digits.
    #[error("the path contains a broken percent-escape")]
    BadEscape,
    /// `..` that climbs above the root.
    #[error("the path climbs above the root with `..`")]
    AboveRoot,
}

/// A normalized absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath(String);

impl NormalPath {
    /// The target of `OPTIONS *` (RFC 9112 §3.2.4: the server as a whole),
    /// which lies in no domain.
    pub fn asterisk() -> NormalPath {
        NormalPath("*".to_owned())
    }

    /// The normalized path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NormalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Normalizes an absolute request path (without its query).
pub fn normalize(raw: &str) -> Result<NormalPath, PathError> {
    // Almost every path a writer sends is already in normal form; one scan
    // proves it, and spares the segment-by-segment rebuild (five
    // allocations for a two-segment path).
    if is_normal(raw.as_bytes()) {
        return Ok(NormalPath(raw.to_owned()));
    }
    normalize_slowly(raw)
}

/// Whether `raw` is its own normal form, judged conservatively: absolute,
/// only bytes that stand for themselves (no `%`, no byte that is refused
/// or escaped), no empty segment but a last one, and no `.` or `..`
/// segment. A false answer only means the full normalization must decide.
fn is_normal(raw: &[u8]) -> bool {
    if raw.first() != Some(&b'/') {
        return false;
    }
    let mut segment_start = 1;
    for (i, &b) in raw.iter().enumerate().skip(1) {
        match b {
            b'/' => {
                if matches!(&raw[segment_start..i], b"" | b"." | b"..") {
                    return false;
                }
                segment_start = i + 1;
            }
            _ if is_raw(b) => {}
            _ => return false,
        }
    }
    !matches!(&raw[segment_start..], b"." | b"..")
}

/// The full normalization: decodes, checks and resolves every segment.
fn normalize_slowly(raw: &str) -> Result<NormalPath, PathError> {
    let raw = raw.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut segments: Vec<String> = Vec::new();
    // Whether the normal form ends in `/`: after an empty last segment, or a
    // last segment of `.` or `..` (RFC 3986 §5.2.4 keeps the slash there).
    let mut trailing_slash = false;
    for raw_segment in raw[1..].split(|b| *b == b'/') {
        let segment = decode_segment(raw_segment)?;
        trailing_slash = true;
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            _ => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(raw.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(NormalPath(out))
}

/// Normalizes a domain prefix from the configuration: like a path, and then
/// always ending in `/` so it matches whole segments only.
pub fn normalize_prefix(raw: &str) -> Result<String, PathError> {
    let mut prefix = normalize(raw)?.0;
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(prefix)
}

/// Whether `path` lies under `prefix` (which ends in `/`) on whole segments;
/// the collection itself (`/orders` for `/orders/`) lies under it too, since
/// a DELETE or MOVE of it changes everything the domain guards.
pub fn lies_under(path: &NormalPath, prefix: &str) -> bool {
    lies_under_str(path.as_str(), prefix)
}

/// [`lies_under`] for a path given as text (the state file reasons about
/// which domain guards which paths without requests).
pub fn lies_under_str(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix) || (path.len() + 1 == prefix.len() && prefix.starts_with(path))
}

fn decode_segment(raw: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let hex = raw.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
                let value = (hex_value(hex[0])? << 4) | hex_value(hex[1])?;
                if is_raw(value) {
                    out.push(char::from(value));
                } else if value == b'/' || value == b'\\' {
                    return Err(PathError::EncodedSeparator);
                } else if is_control(value) {
                    return Err(PathError::ControlByte);
                } else {
                    push_escaped(&mut out, value);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Semicolon),
            _ if is_control(b) => return Err(PathError::ControlByte),
            0x80.. => return Err(PathError::NonAscii),
            _ if is_raw(b) => out.push(char::from(b)),
            // Printable, yet no `pchar` (`|`, `"`, a space in a prefix):
            // escaped, as a client must send most of them.
            _ => push_escaped(&mut out, b),
        }
        i += 1;
    }
    Ok(out)
}

fn push_escaped(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(hex_digit(b >> 4)));
    out.push(char::from(hex_digit(b & 0xF)));
}

/// Whether `b` stands raw in the normal form: RFC 3986's `pchar` but `;`,
/// which is refused (a store may strip it as a path parameter). Escaped,
/// each of these is decoded: a store that decodes reads both spellings as
/// one path. A table: it is asked for every byte of every path.
#[inline]
fn is_raw(b: u8) -> bool {
    RAW[usize::from(b)]
}

/// [`is_raw`] for each byte.
static RAW: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < table.len() {
        let byte = b as u8; // b < 256
        table[b] = byte.is_ascii_alphanumeric()
            || matches!(
                byte,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
            );
        b += 1;
    }
    table
};

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7F
}

fn hex_value(b: u8) -> Result<u8, PathError> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(PathError::BadEscape),
    }
}

fn hex_digit(v: u8) -> u8 {
    b"0123456789ABCDEF"[usize::from(v)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(raw: &str) -> Result<String, PathError> {
        normalize(raw).map(|p| p.0)
    }

    #[test]
    fn normal_forms() {
        let cases = [
            ("/", "/"),
            ("//", "/"),
            ("/orders/1", "/orders/1"),
            ("/orders/", "/orders/"),
            ("//orders///1", "/orders/1"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/../orders/x", "/orders/x"),
            ("/%6Frders/x", "/orders/x"),
            ("/a/%2e%2E/x", "/x"),
            ("/a/%2e%2e/b", "/b"),
            ("/a%7eb", "/a~b"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%20b", "/a%20b"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            // One spelling per byte: `pchar`s raw, every other byte escaped.
            ("/a%40b%3a%21%2B%3D%2C%24%26%27%28%29%2A", "/a@b:!+=,$&'()*"),
            ("/a@b:!+=,$&'()*", "/a@b:!+=,$&'()*"),
            ("/a|b", "/a%7Cb"),
            ("/a%7cb", "/a%7Cb"),
            ("/a\"{}[]^", "/a%22%7B%7D%5B%5D%5E"),
            ("/my orders/", "/my%20orders/"),
            ("/a%3Bb%25%23", "/a%3Bb%25%23"),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refusals() {
        let cases = [
            ("orders", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%5Cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::Backslash),
            ("/a;b", PathError::Semicolon),
            ("/orders;x=1/a", PathError::Semicolon),
            ("/a%00", PathError::ControlByte),
            ("/a%0a", PathError::ControlByte),
            ("/a%7F", PathError::ControlByte),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/..", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/%2e%2e/%2e%2e", PathError::AboveRoot),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn lies_under_matches_whole_segments() {
        let p = |s: &str| normalize(s).unwrap();
        assert!(lies_under(&p("/orders/1"), "/orders/"));
        assert!(lies_under(&p("/orders/"), "/orders/"));
        assert!(lies_under(&p("/orders"), "/orders/"));
        assert!(!lies_under(&p("/ordersX/1"), "/orders/"));
        assert!(!lies_under(&p("/order"), "/orders/"));
        assert!(!lies_under(&p("/ORDERS/1"), "/orders/"));
        assert!(lies_under(&p("/anything"), "/"));
    }

    /// How a naive store reads a path: decode everything, then resolve.
    fn store_view(path: &str) -> String {
        let mut decoded = Vec::new();
        let b = path.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                decoded.push(u8::from_str_radix(&path[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                decoded.push(b[i]);
                i += 1;
            }
        }
        let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
        let mut stack: Vec<&str> = Vec::new();
        for seg in text.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    stack.pop();
                }
                s => stack.push(s),
            }
        }
        format!("/{}", stack.join("/"))
    }

    /// Characters a path may contain raw, plus the troublemakers.
    fn path_char() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z0-9]".prop_map(String::from),
            2 => Just("/".to_owned()),
            2 => Just(".".to_owned()),
            1 => Just("..".to_owned()),
            1 => "%[0-9a-fA-F]{2}".prop_map(String::from),
            1 => Just("%2e".to_owned()),
            1 => Just(";".to_owned()),
            1 => Just("\\".to_owned()),
            1 => "[@:!+=|\"{}]".prop_map(String::from),
        ]
    }

    #[test]
    fn the_quick_check_only_passes_normal_forms() {
        for normal in [
            "/",
            "/orders/1",
            "/orders/",
            "/a.b/..c/...",
            "/a~b-c_d",
            "/a@b:c!d+e",
        ] {
            assert!(is_normal(normal.as_bytes()), "{normal}");
        }
        for other in [
            "", "a", "//", "/a//b", "/a/./b", "/a/..", "/.", "/a/.", "/%41", "/a;b", "/a\\b", "/a\tb", "/é",
            "/a|b", "/a b",
        ] {
            assert!(!is_normal(other.as_bytes()), "{other}");
        }
    }

    proptest! {
        #[test]
        fn the_quick_path_agrees_with_the_full_normalization(parts in proptest::collection::vec(path_char(), 0..24)) {
            let raw = format!("/{}", parts.concat());
            prop_assert_eq!(normalize(&raw), normalize_slowly(&raw), "{}", raw);
        }

        #[test]
        fn normal_form_is_a_fixed_point(parts in proptest::collection::vec(path_char(), 0..24)) {
            let raw = format!("/{}", parts.concat());
            if let Ok(once) = normalize(&raw) {
                let twice = normalize(once.as_str()).expect("a normal form normalizes");
                prop_assert_eq!(&once, &twice);
                let s = once.as_str();
                prop_assert!(s.starts_with('/'));
                prop_assert!(!s.contains("//"), "{}", s);
                prop_assert!(s.split('/').all(|seg| seg != "." && seg != ".."), "{}", s);
                prop_assert!(!s.contains(';') && !s.contains('\\'));
            }
        }

        #[test]
        fn decoding_unreserved_never_changes_the_result(
            parts in proptest::collection::vec("[a-z0-9./]{1,3}", 1..12),
            pick in any::<proptest::sample::Index>(),
        ) {
            // Encoding any unreserved byte must not move the path elsewhere.
            let raw = format!("/{}", parts.concat());
            let bytes = raw.as_bytes();
            let i = pick.index(bytes.len());
            if bytes[i] != b'/' {
                let encoded = format!("{}%{:02X}{}", &raw[..i], bytes[i], &raw[i + 1..]);
                prop_assert_eq!(normalize(&raw), normalize(&encoded));
            }
        }

        #[test]
        fn every_spelling_of_a_byte_normalizes_alike(
            parts in proptest::collection::vec(path_char(), 1..12),
            pick in any::<proptest::sample::Index>(),
        ) {
            // A store that decodes every escape reads a byte and its escape
            // as one path: so must the domains (`%40` was judged apart from
            // `@`, found by review).
            let raw = format!("/{}", parts.concat());
            let bytes = raw.as_bytes();
            let i = pick.index(bytes.len());
            let in_escape = bytes[i.saturating_sub(2)..i].contains(&b'%');
            if !matches!(bytes[i], b'/' | b'%') && !in_escape {
                let encoded = format!("{}%{:02x}{}", &raw[..i], bytes[i], &raw[i + 1..]);
                let (plain, escaped) = (normalize(&raw), normalize(&encoded));
                match (&plain, &escaped) {
                    // `;` and `\\` are refused raw, whatever their escapes do.
                    (Err(_), _) => {}
                    _ => prop_assert_eq!(plain, escaped, "{} / {}", raw, encoded),
                }
            }
        }

        #[test]
        fn the_store_sees_the_domain_we_judged(
            parts in proptest::collection::vec(path_char(), 0..24),
        ) {
            // A store that decodes every escape and then resolves `.`, `..`
            // and `\` itself must place the forwarded path in the same
            // domain as we did.
            let raw = format!("/{}", parts.concat());
            if let Ok(p) = normalize(&raw) {
                let seen = store_view(p.as_str());
                let store_says = seen.starts_with("/orders/") || seen == "/orders";
                prop_assert_eq!(lies_under(&p, "/orders/"), store_says, "{} -> {}", p, seen);
            }
        }
    }
}
