//! The SASL initial responses of the two bearer-token mechanisms, built by hand (they are one
//! line each) and base64-encoded for IMAP `AUTHENTICATE` and POP3 `AUTH`.
//!
//! - XOAUTH2 (Google's, also Microsoft's): `user=U^Aauth=Bearer T^A^A`.
//! - OAUTHBEARER (RFC 7628): `n,a=U,^Ahost=H^Aport=P^Aauth=Bearer T^A^A`; the GS2 header must
//!   name the user (Dovecot refuses it otherwise).
//!
//! On failure both servers send a base64 JSON challenge; the client answers it with an empty
//! response (RFC 7628 3.2.3 says a dummy `^A`, but an empty line is what XOAUTH2 wants and what
//! Dovecot, Gmail and Microsoft accept for both) and the server then sends its NO / -ERR.

use base64::Engine;

use crate::config::Secret;

pub use crate::config::Mechanism;

/// The raw (not yet base64-encoded) initial client response. A secret: it holds the token.
pub fn initial_response(
    mechanism: Mechanism,
    user: &str,
    host: &str,
    port: u16,
    token: &Secret,
) -> Secret {
    let token = token.expose();
    Secret::new(match mechanism {
        Mechanism::XOAuth2 => format!("user={user}\x01auth=Bearer {token}\x01\x01"),
        Mechanism::OAuthBearer => format!(
            "n,a={},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01",
            gs2_name(user)
        ),
    })
}

/// The same, base64-encoded for the wire.
pub fn encoded_initial_response(
    mechanism: Mechanism,
    user: &str,
    host: &str,
    port: u16,
    token: &Secret,
) -> Secret {
    let raw = initial_response(mechanism, user, host, port, token);
    Secret::new(base64::engine::general_purpose::STANDARD.encode(raw.expose()))
}

/// RFC 5801 `saslname`: `,` and `=` escaped as `=2C` and `=3D`.
fn gs2_name(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// What a server's error challenge says, for the error message: the JSON's `status` (and
/// `scope` when present), never the challenge bytes themselves if they are not that JSON.
pub fn describe_challenge(challenge: &[u8]) -> String {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(challenge) else {
        return "an unreadable error challenge".into();
    };
    let field = |k: &str| match value.get(k) {
        Some(serde_json::Value::String(s)) => Some(clip(s)),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    match (field("status"), field("scope")) {
        (Some(s), Some(scope)) => format!("status {s}, scope {scope}"),
        (Some(s), None) => format!("status {s}"),
        _ => "an error challenge without a status".into(),
    }
}

fn clip(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect::<String>()
}

/// Decodes base64 the way servers send it (standard alphabet, padding optional).
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Secret {
        Secret::new("ya29.token")
    }

    #[test]
    fn xoauth2_matches_googles_format() {
        let raw = initial_response(Mechanism::XOAuth2, "me@gmail.com", "h", 993, &tok());
        assert_eq!(
            raw.expose(),
            "user=me@gmail.com\x01auth=Bearer ya29.token\x01\x01"
        );
        // Google's documented example: user=someuser@example.com, token ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg
        let enc = encoded_initial_response(
            Mechanism::XOAuth2,
            "someuser@example.com",
            "imap.gmail.com",
            993,
            &Secret::new("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"),
        );
        assert_eq!(
            enc.expose(),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn oauthbearer_follows_rfc_7628() {
        let raw = initial_response(
            Mechanism::OAuthBearer,
            "user@example.com",
            "server.example.com",
            143,
            &Secret::new("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="),
        );
        // RFC 7628 section 4.1, with the authzid the RFC leaves out
        assert_eq!(
            raw.expose(),
            "n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        let enc = encoded_initial_response(Mechanism::OAuthBearer, "a", "h", 1, &tok());
        assert_eq!(
            decode(enc.expose()).unwrap(),
            b"n,a=a,\x01host=h\x01port=1\x01auth=Bearer ya29.token\x01\x01"
        );
    }

    #[test]
    fn gs2_names_are_escaped() {
        let raw = initial_response(Mechanism::OAuthBearer, "a,b=c", "h", 1, &tok());
        assert!(raw.expose().starts_with("n,a=a=2Cb=3Dc,\x01"));
    }

    #[test]
    fn responses_are_secrets() {
        let enc = encoded_initial_response(Mechanism::XOAuth2, "u", "h", 1, &tok());
        assert_eq!(format!("{enc:?} {enc}"), "Secret(***) ***");
    }

    #[test]
    fn challenges_are_described_without_their_bytes() {
        let dovecot =
            decode("eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=").unwrap();
        assert_eq!(describe_challenge(&dovecot), "status 401, scope mail");
        assert_eq!(
            describe_challenge(br#"{"status":"invalid_token"}"#),
            "status invalid_token"
        );
        assert_eq!(
            describe_challenge(b"garbage"),
            "an unreadable error challenge"
        );
        assert_eq!(decode("e30"), Some(b"{}".to_vec()));
    }
}
