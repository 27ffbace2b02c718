//! The fencing token: parsed once at the edge into [`Token`], so no code past
//! the edge handles a raw header string.

use std::fmt;

/// A fencing token: a positive int64, as an etcd revision is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(u64);

/// Why a token header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The header was given more than once.
    #[error("the fencing header was given more than once")]
    Repeated,
    /// The value is not a canonical positive decimal int64.
    #[error("the fencing token must be a positive decimal integer of at most 9223372036854775807, without sign or leading zeros")]
    Malformed,
}

impl Token {
    /// Largest token: etcd revisions are int64.
    pub const MAX: u64 = i64::MAX as u64;

    /// Makes a token from a number, if it is a valid one (1..=i64::MAX).
    pub fn new(value: u64) -> Option<Token> {
        (1..=Self::MAX).contains(&value).then_some(Token(value))
    }

    /// The token's value.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Parses a header value: optional whitespace, then `[1-9][0-9]{0,18}`
    /// no larger than `i64::MAX`.
    pub fn parse(raw: &[u8]) -> Result<Token, TokenError> {
        let digits = trim_ows(raw);
        let valid_shape = matches!(digits.first(), Some(b'1'..=b'9'))
            && digits.len() <= 19
            && digits.iter().all(u8::is_ascii_digit);
        if !valid_shape {
            return Err(TokenError::Malformed);
        }
        // At most 19 digits: below u64::MAX (20 digits), so no overflow here;
        // the int64 bound is checked by `Token::new`.
        let value = digits.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        Token::new(value).ok_or(TokenError::Malformed)
    }

    /// Parses the token out of every value of the fencing header: none is
    /// `Ok(None)`, more than one is an error.
    pub fn from_values<'a, I>(mut values: I) -> Result<Option<Token>, TokenError>
    where
        I: Iterator<Item = &'a http::HeaderValue>,
    {
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(TokenError::Repeated);
        }
        Token::parse(first.as_bytes()).map(Some)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Strips optional whitespace (space and tab, RFC 9110 §5.6.3) from both ends.
fn trim_ows(raw: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = raw.iter().position(|b| !is_ows(b)).unwrap_or(raw.len());
    let end = raw.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &raw[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_canonical_tokens() {
        assert_eq!(Token::parse(b"1").unwrap().get(), 1);
        assert_eq!(Token::parse(b" \t42 ").unwrap().get(), 42);
        assert_eq!(Token::parse(b"9223372036854775807").unwrap().get(), Token::MAX);
    }

    #[test]
    fn refuses_everything_else() {
        for raw in [
            &b""[..],
            b" ",
            b"0",
            b"007",
            b"+5",
            b"-5",
            b"5x",
            b"0x10",
            b"1 2",
            b"1.0",
            b"9223372036854775808",
            b"18446744073709551616",
            b"99999999999999999999",
            "\u{0661}".as_bytes(),
        ] {
            assert_eq!(Token::parse(raw), Err(TokenError::Malformed), "{raw:?}");
        }
    }

    #[test]
    fn repeated_header_is_refused() {
        let a = http::HeaderValue::from_static("5");
        let b = http::HeaderValue::from_static("5");
        assert_eq!(
            Token::from_values([&a, &b].into_iter()),
            Err(TokenError::Repeated)
        );
        assert_eq!(Token::from_values([&a].into_iter()), Ok(Token::new(5)));
        assert_eq!(Token::from_values(std::iter::empty()), Ok(None));
    }

    proptest! {
        #[test]
        fn every_valid_token_round_trips(v in 1u64..=Token::MAX, pre in "[ \t]{0,3}", post in "[ \t]{0,3}") {
            let text = format!("{pre}{v}{post}");
            prop_assert_eq!(Token::parse(text.as_bytes()).map(Token::get), Ok(v));
        }

        #[test]
        fn parse_agrees_with_the_grammar(raw in proptest::collection::vec(any::<u8>(), 0..24)) {
            // The reference: the regex of the spec, then the int64 bound.
            let trimmed = trim_ows(&raw);
            let text = std::str::from_utf8(trimmed).ok();
            let expected = text
                .filter(|t| !t.is_empty() && t.len() <= 19 && !t.starts_with('0') && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<i64>().ok())
                .map(|v| v as u64);
            prop_assert_eq!(Token::parse(&raw).ok().map(Token::get), expected);
        }

        #[test]
        fn digit_strings_match_std(v in "[0-9+-]{1,21}") {
            let ours = Token::parse(v.as_bytes()).ok().map(Token::get);
            let reference = v.parse::<i64>().ok()
                .filter(|n| *n > 0 && v.as_bytes()[0] != b'0' && v.as_bytes()[0] != b'+')
                .map(|n| n as u64);
            prop_assert_eq!(ours, reference);
        }
    }
}
