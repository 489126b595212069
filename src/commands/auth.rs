//! `mailpump auth ACCOUNT`: gets the first refresh token of an OAuth2 account with the
//! authorization-code grant and PKCE. Prints the authorization URL, reads the address the
//! browser was sent to (or the bare code) from stdin, exchanges the code at the account's
//! token endpoint and writes the refresh token to a file with mode 0600 (atomically).

use std::io::BufRead;
use std::path::PathBuf;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::config::{Config, Provider, TokenSource};

pub const GOOGLE_AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";

pub struct AuthOptions {
    pub account: String,
    /// Where to write the refresh token (default: the account's refresh_token_file).
    pub out: Option<PathBuf>,
    /// The authorization endpoint (required for provider = "custom").
    pub authorize_url: Option<String>,
    pub redirect_uri: String,
}

/// A PKCE verifier (RFC 7636: 43..128 unreserved characters) and its S256 challenge.
pub fn pkce() -> (String, String) {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~";
    let mut rng = rand::thread_rng();
    let verifier: String = (0..64)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    (verifier.clone(), challenge(&verifier))
}

pub fn challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The code in what was pasted: a redirect address (`...?code=...&state=...`) or the code alone.
pub fn code_from(pasted: &str, state: &str) -> Result<String, String> {
    let pasted = pasted.trim();
    if !pasted.contains("code=") && !pasted.contains("error=") {
        return if pasted.is_empty() {
            Err("nothing was pasted".into())
        } else {
            Ok(pasted.to_string())
        };
    }
    let query = pasted.split_once('?').map(|(_, q)| q).unwrap_or(pasted);
    let query = query.split('#').next().unwrap_or(query);
    let params: Vec<(String, String)> = reqwest::Url::parse(&format!("http://x/?{query}"))
        .map_err(|e| format!("cannot read the address: {e}"))?
        .query_pairs()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if let Some(error) = get("error") {
        return Err(format!(
            "the provider refused: {error} {}",
            get("error_description").unwrap_or_default()
        ));
    }
    if let Some(s) = get("state") {
        if s != state {
            return Err("the state in the address is not this run's: paste the address of the consent this run started".into());
        }
    }
    get("code").ok_or_else(|| "no code in the address".into())
}

pub async fn auth(config: &Config, options: AuthOptions) -> bool {
    match run(config, options).await {
        Ok(path) => {
            println!("✓ refresh token written to {} (mode 0600)", path.display());
            true
        }
        Err(e) => {
            eprintln!("mailpump auth: {e}");
            false
        }
    }
}

async fn run(config: &Config, options: AuthOptions) -> Result<PathBuf, String> {
    let name = &options.account;
    let account = config
        .accounts
        .iter()
        .find(|a| &a.name == name)
        .ok_or_else(|| format!("no account {name:?} in the config"))?;
    let Some(oauth) = &account.oauth2 else {
        return Err(format!("account {name} has no auth = \"oauth2\""));
    };
    let TokenSource::Endpoint(ep) = &oauth.source else {
        return Err(format!(
            "account {name} gets its tokens from access_token_command: nothing to do here"
        ));
    };
    let out = options
        .out
        .clone()
        .or_else(|| ep.refresh_token_file.clone())
        .ok_or_else(|| format!("say where to write the refresh token: --out FILE (or set refresh_token_file in [accounts.{name}.oauth2])"))?;
    let authorize = match (&options.authorize_url, ep.provider) {
        (Some(u), _) => u.clone(),
        (None, Provider::Google) => GOOGLE_AUTHORIZE_URL.to_string(),
        (None, Provider::Microsoft) => match ep.token_url.strip_suffix("/token") {
            Some(base) => format!("{base}/authorize"),
            None => {
                return Err(
                    "cannot derive the authorization URL from token_url: pass --authorize-url"
                        .into(),
                )
            }
        },
        (None, Provider::Custom) => {
            return Err("provider = \"custom\": pass --authorize-url".into())
        }
    };
    let (verifier, challenge) = pkce();
    let state = hex::encode(rand::random::<[u8; 12]>());
    let mut params: Vec<(&str, &str)> = vec![
        ("client_id", ep.client_id.as_str()),
        ("redirect_uri", options.redirect_uri.as_str()),
        ("response_type", "code"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("state", state.as_str()),
    ];
    if let Some(scope) = &ep.scope {
        params.push(("scope", scope.as_str()));
    }
    if ep.provider == Provider::Google {
        params.push(("access_type", "offline"));
        params.push(("prompt", "consent"));
    }
    let url = reqwest::Url::parse_with_params(&authorize, &params)
        .map_err(|e| format!("bad authorization URL {authorize:?}: {e}"))?;
    println!(
        "Open this address in a browser, sign in as {} and allow access:",
        account.username
    );
    println!("{url}");
    println!(
        "Then paste the address the browser was sent to ({}?code=...), or just the code:",
        options.redirect_uri
    );
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot read stdin: {e}"))?;
    let code = code_from(&line, &state)?;
    let token = crate::oauth::exchange_code(name, ep, &code, &options.redirect_uri, &verifier)
        .await
        .map_err(|e| e.to_string())?;
    let path = out.clone();
    tokio::task::spawn_blocking(move || crate::oauth::write_secret_file(&path, &token, 0o600))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc_7636() {
        // RFC 7636 appendix B
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let (v, c) = pkce();
        assert_eq!(v.len(), 64);
        assert_eq!(challenge(&v), c);
    }

    #[test]
    fn codes_are_read_from_addresses_or_alone() {
        assert_eq!(
            code_from("http://localhost/?code=4%2F0Ab&state=s1&scope=x\n", "s1").unwrap(),
            "4/0Ab"
        );
        assert_eq!(code_from(" 4/0Ab \n", "s1").unwrap(), "4/0Ab");
        assert!(code_from("http://localhost/?code=c&state=other", "s1").is_err());
        assert!(code_from("http://localhost/?error=access_denied", "s1")
            .unwrap_err()
            .contains("access_denied"));
        assert!(code_from("\n", "s1").is_err());
    }
}
