//! Mailbox names on the wire: IMAP's modified UTF-7 (RFC 3501 section 5.1.3) and quoting.

use base64::alphabet::IMAP_MUTF7;
use base64::engine::general_purpose::NO_PAD;
use base64::engine::GeneralPurpose;
use base64::Engine;

const MUTF7: GeneralPurpose = GeneralPurpose::new(&IMAP_MUTF7, NO_PAD);

/// Encodes a mailbox name (`已发送` -> `&XfJT0ZAB-`).
pub fn encode_mailbox(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        out.push_str(&MUTF7.encode(bytes));
        out.push('-');
        pending.clear();
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Decodes a mailbox name as the server sent it (`&XfJT0ZAB-` -> `已发送`). None when the name
/// is not valid modified UTF-7 (a server that sends raw UTF-8, or a broken encoding): the
/// caller keeps the bytes as they came.
pub fn decode_mailbox(wire: &str) -> Option<String> {
    let mut out = String::with_capacity(wire.len());
    let mut rest = wire;
    while let Some(amp) = rest.find('&') {
        let (plain, tail) = rest.split_at(amp);
        if !plain.chars().all(|c| (' '..='~').contains(&c)) {
            return None;
        }
        out.push_str(plain);
        let tail = &tail[1..];
        let end = tail.find('-')?;
        let (b64, after) = (&tail[..end], &tail[end + 1..]);
        if b64.is_empty() {
            out.push('&');
        } else {
            let bytes = MUTF7.decode(b64).ok()?;
            if bytes.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = bytes
                .chunks(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            let text = String::from_utf16(&units).ok()?;
            // RFC 3501: printable US-ASCII must not be encoded
            if text.chars().any(|c| (' '..='~').contains(&c)) {
                return None;
            }
            out.push_str(&text);
        }
        rest = after;
    }
    if !rest.chars().all(|c| (' '..='~').contains(&c)) {
        return None;
    }
    out.push_str(rest);
    Some(out)
}

/// An IMAP quoted string.
pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The wire form of a mailbox argument: encoded, then quoted.
pub fn mailbox_arg(name: &str) -> String {
    quote(&encode_mailbox(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_names_pass_through_and_ampersand_is_escaped() {
        assert_eq!(encode_mailbox("INBOX"), "INBOX");
        assert_eq!(encode_mailbox("Tom & Jerry"), "Tom &- Jerry");
    }

    #[test]
    fn non_ascii_names_use_modified_utf7() {
        // RFC 3501's own example
        assert_eq!(
            encode_mailbox("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(encode_mailbox("已发送"), "&XfJT0ZAB-");
    }

    #[test]
    fn decoding_reverses_encoding_and_refuses_what_is_not_modified_utf7() {
        for name in [
            "INBOX",
            "Tom & Jerry",
            "~peter/mail/台北/日本語",
            "已发送",
            "Entwürfe",
            "a&b&c😀",
        ] {
            assert_eq!(decode_mailbox(&encode_mailbox(name)).as_deref(), Some(name));
        }
        assert_eq!(decode_mailbox("Entw&APw-rfe").as_deref(), Some("Entwürfe"));
        assert_eq!(decode_mailbox("&-").as_deref(), Some("&"));
        assert_eq!(decode_mailbox("broken&XfJT0ZAB"), None, "no closing dash");
        assert_eq!(
            decode_mailbox("已发送"),
            None,
            "raw UTF-8 is not modified UTF-7"
        );
        assert_eq!(
            decode_mailbox("&AGEAYgBj-"),
            None,
            "encoded ASCII is not canonical"
        );
    }

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
