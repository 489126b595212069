//! Which folders of an account are synced, and how each is followed. Pure: the folder list
//! comes from the server (`imap::Session::list_folders`), this module only decides.
//!
//! A selector in `mailboxes`, `exclude` or `watch` is one of:
//! - a name (`"INBOX"`, `"Archive.2024"`, `"已发送"`), matched exactly (`INBOX` in any case);
//! - `"*"`: every folder;
//! - a glob: `*` within one level, `**` over any number of levels, `?` one character. `/` in a
//!   glob stands for the server's hierarchy delimiter (whatever it is), and a glob is matched
//!   both against the full name and against the name without the personal namespace prefix
//!   (Courier's `INBOX.`): `"Projects/*"` matches `Projects.a` on Dovecot and `INBOX.Projects.a`
//!   on Courier;
//! - a special-use attribute (RFC 6154): `"\\Sent"`, `"\\Archive"`, `"\\All"`, `"\\Drafts"`,
//!   `"\\Flagged"`, `"\\Junk"`, `"\\Trash"`, matched by the attributes LIST reports.
//!
//! A folder is synced when a `mailboxes` selector matches it, no `exclude` selector does (a
//! folder asked for by name or special-use is never excluded), and it can be selected
//! (`\Noselect` and `\NonExistent` are left out). A name given literally is synced even where
//! LIST does not show it (the catch-up then reports it missing). Of the
//! synced folders, those matching `watch` get their own IDLE connection, as many as
//! `max_connections` allows beside the one connection that follows all the others.

use std::collections::BTreeMap;

use crate::config::Account;
use crate::imap::{ListEntry, Namespace};

/// The special-use attributes of RFC 6154.
const SPECIAL_USE: &[&str] = &[
    "\\all",
    "\\archive",
    "\\drafts",
    "\\flagged",
    "\\junk",
    "\\sent",
    "\\trash",
];

/// One selector of `mailboxes`, `exclude` or `watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Name(String),
    /// `"*"`.
    Every,
    /// A glob's segments, split at `/`.
    Glob(Vec<String>),
    /// Lowercase, with its backslash: `\sent`.
    Use(String),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, String> {
        if text.is_empty() || text.contains(['\r', '\n', '\0']) {
            return Err(format!("invalid name {text:?}"));
        }
        if let Some(rest) = text.strip_prefix('\\') {
            let lower = format!("\\{}", rest.to_ascii_lowercase());
            return if SPECIAL_USE.contains(&lower.as_str()) {
                Ok(Selector::Use(lower))
            } else {
                Err(format!(
                    "{text:?} is not a special-use name (\\\\All, \\\\Archive, \\\\Drafts, \\\\Flagged, \\\\Junk, \\\\Sent, \\\\Trash)"
                ))
            };
        }
        if text == "*" {
            return Ok(Selector::Every);
        }
        if text.contains(['*', '?']) {
            let segments: Vec<String> = text.split('/').map(str::to_string).collect();
            if segments.iter().any(|s| s.is_empty()) {
                return Err(format!("{text:?} has an empty level"));
            }
            return Ok(Selector::Glob(segments));
        }
        Ok(Selector::Name(text.to_string()))
    }

    fn matches(&self, folder: &Folder, namespace: Option<&str>) -> bool {
        match self {
            Selector::Name(n) => name_matches(n, folder, namespace),
            Selector::Every => true,
            Selector::Use(u) => folder.attributes.iter().any(|a| a == u),
            Selector::Glob(segments) => {
                let levels = |name: &str| -> Vec<String> {
                    match folder.delimiter {
                        Some(d) => name.split(d).map(str::to_string).collect(),
                        None => vec![name.to_string()],
                    }
                };
                let full = levels(&folder.name);
                if glob_levels(segments, &full) {
                    return true;
                }
                match namespace.and_then(|p| folder.name.strip_prefix(p)) {
                    Some(rest) if !rest.is_empty() => glob_levels(segments, &levels(rest)),
                    _ => false,
                }
            }
        }
    }
}

/// A name as written in the config against a listed folder: exactly, or with `/` standing for
/// the server's delimiter, with or without the personal namespace's prefix.
fn name_matches(written: &str, folder: &Folder, namespace: Option<&str>) -> bool {
    if same_name(written, &folder.name) {
        return true;
    }
    let without_prefix = namespace.and_then(|p| folder.name.strip_prefix(p));
    if without_prefix == Some(written) {
        return true;
    }
    let Some(d) = folder
        .delimiter
        .filter(|d| *d != '/' && written.contains('/'))
    else {
        return false;
    };
    let translated = written.replace('/', &d.to_string());
    translated == folder.name || without_prefix == Some(translated.as_str())
}

fn same_name(a: &str, b: &str) -> bool {
    a == b || (a.eq_ignore_ascii_case("INBOX") && b.eq_ignore_ascii_case("INBOX"))
}

/// `**` over any number of levels; otherwise one pattern segment per level.
fn glob_levels(pattern: &[String], levels: &[String]) -> bool {
    match pattern.split_first() {
        None => levels.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=levels.len()).any(|skip| glob_levels(rest, &levels[skip..]))
        }
        Some((first, rest)) => match levels.split_first() {
            Some((level, more)) => {
                glob_one(first.as_bytes(), level.as_bytes()) && glob_levels(rest, more)
            }
            None => false,
        },
    }
}

/// `*` and `?` within one level (by character).
fn glob_one(pattern: &[u8], text: &[u8]) -> bool {
    let p: Vec<char> = String::from_utf8_lossy(pattern).chars().collect();
    let t: Vec<char> = String::from_utf8_lossy(text).chars().collect();
    // classic two-pointer wildcard match
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// A folder as the server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    /// UTF-8, with the server's delimiter.
    pub name: String,
    pub delimiter: Option<char>,
    /// Lowercase (`\noselect`, `\sent`).
    pub attributes: Vec<String>,
}

impl From<&ListEntry> for Folder {
    fn from(e: &ListEntry) -> Folder {
        Folder {
            name: if e.name.eq_ignore_ascii_case("INBOX") {
                "INBOX".to_string()
            } else {
                e.name.clone()
            },
            delimiter: e.delimiter,
            attributes: e.attributes.clone(),
        }
    }
}

/// How a synced folder is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Follow {
    /// Its own connection in IDLE (or NOOP polling where the server has no IDLE).
    Watch,
    /// The account's shared connection (NOTIFY, or a STATUS poll).
    Shared,
}

/// What the selection made of the account's folders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Synced folders, by name.
    pub synced: BTreeMap<String, Follow>,
    /// Folders left out, with the reason.
    pub left_out: BTreeMap<String, String>,
    /// Watched folders moved to the shared connection because of `max_connections`.
    pub demoted: Vec<String>,
}

impl Plan {
    pub fn watched(&self) -> impl Iterator<Item = &String> {
        self.synced
            .iter()
            .filter(|(_, f)| **f == Follow::Watch)
            .map(|(n, _)| n)
    }
    pub fn shared(&self) -> impl Iterator<Item = &String> {
        self.synced
            .iter()
            .filter(|(_, f)| **f == Follow::Shared)
            .map(|(n, _)| n)
    }
}

/// The selectors of one account.
#[derive(Debug, Clone)]
pub struct Selection {
    include: Vec<(String, Selector)>,
    exclude: Vec<(String, Selector)>,
    watch: Vec<Selector>,
    max_connections: usize,
}

impl Selection {
    pub fn of(account: &Account) -> Selection {
        let parse = |list: &[String]| -> Vec<(String, Selector)> {
            list.iter()
                .filter_map(|s| Selector::parse(s).ok().map(|sel| (s.clone(), sel)))
                .collect()
        };
        Selection {
            include: parse(&account.mailboxes),
            exclude: parse(&account.exclude),
            watch: parse(&account.watch).into_iter().map(|(_, s)| s).collect(),
            max_connections: account.settings.max_connections,
        }
    }

    /// True when the account needs no folder list: every selector is a name, nothing is
    /// excluded, every folder is watched and there are no more than `max_connections`. Such an
    /// account runs exactly as before folder selection existed: one connection per folder.
    pub fn fixed(&self) -> Option<Vec<String>> {
        let names: Vec<String> = self
            .include
            .iter()
            .map(|(_, s)| match s {
                Selector::Name(n) => Some(n.clone()),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let watched = names.iter().all(|n| {
            self.watch.iter().any(|w| match w {
                Selector::Name(m) => same_name(m, n),
                Selector::Every => true,
                _ => false,
            })
        });
        (self.exclude.is_empty() && watched && names.len() <= self.max_connections).then_some(names)
    }

    /// Decides for every listed folder. `namespace` is the personal namespace's prefix.
    pub fn plan(&self, listed: &[Folder], namespace: Option<&str>) -> Plan {
        let mut plan = Plan::default();
        let mut watch_order = Vec::new();
        let mut names_found = std::collections::HashSet::new();
        for folder in listed {
            for (i, (_, s)) in self.include.iter().enumerate() {
                if matches!(s, Selector::Name(_)) && s.matches(folder, namespace) {
                    names_found.insert(i);
                }
            }
            let Some(_) = self
                .include
                .iter()
                .find(|(_, s)| s.matches(folder, namespace))
            else {
                continue;
            };
            if let Some(a) = folder
                .attributes
                .iter()
                .find(|a| *a == "\\noselect" || *a == "\\nonexistent")
            {
                let why = if a == "\\noselect" {
                    "\\Noselect"
                } else {
                    "\\NonExistent"
                };
                plan.left_out
                    .insert(folder.name.clone(), format!("{why}: it holds no messages"));
                continue;
            }
            // asked for by name or by its special use: the exclusions do not apply
            let named = self.include.iter().any(|(_, s)| {
                matches!(s, Selector::Name(_) | Selector::Use(_)) && s.matches(folder, namespace)
            });
            if !named {
                if let Some((text, _)) = self
                    .exclude
                    .iter()
                    .find(|(_, s)| s.matches(folder, namespace))
                {
                    plan.left_out
                        .insert(folder.name.clone(), format!("excluded by {text:?}"));
                    continue;
                }
            }
            let watched = self.watch.iter().any(|w| w.matches(folder, namespace));
            // INBOX keeps the spelling the config gives it ("Inbox"): documents stored before
            // folder sync are keyed by it
            let key = self
                .include
                .iter()
                .find_map(|(_, s)| match s {
                    Selector::Name(n) if folder.name == "INBOX" && same_name(n, "INBOX") => {
                        Some(n.clone())
                    }
                    _ => None,
                })
                .unwrap_or_else(|| folder.name.clone());
            if watched {
                watch_order.push(key.clone());
            }
            plan.synced.insert(key, Follow::Shared);
        }
        // names given literally are synced even where LIST did not show them
        for (i, (_, s)) in self.include.iter().enumerate() {
            if let Selector::Name(n) = s {
                if !names_found.contains(&i) {
                    let name = if n.eq_ignore_ascii_case("INBOX") {
                        "INBOX".to_string()
                    } else {
                        n.clone()
                    };
                    let folder = Folder {
                        name: name.clone(),
                        delimiter: None,
                        attributes: Vec::new(),
                    };
                    if self.watch.iter().any(|w| w.matches(&folder, namespace)) {
                        watch_order.push(name.clone());
                    }
                    plan.synced.insert(name, Follow::Shared);
                }
            }
        }
        // INBOX first, then the order of the listing; at most max_connections less the one
        // connection of the account task (it always holds one, to discover)
        watch_order.sort_by_key(|n| !n.eq_ignore_ascii_case("INBOX"));
        let room = self.max_connections.saturating_sub(1);
        for (i, name) in watch_order.into_iter().enumerate() {
            if i < room {
                plan.synced.insert(name, Follow::Watch);
            } else {
                plan.demoted.push(name);
            }
        }
        plan
    }
}

/// The mailboxes of an account that runs one task per mailbox (POP3's one, or an IMAP account
/// whose selection is [`Selection::fixed`]); None for an account that needs folder sync.
pub fn fixed_mailboxes(account: &Account) -> Option<Vec<String>> {
    match account.protocol {
        crate::config::Protocol::Pop3 => Some(account.mailboxes.clone()),
        crate::config::Protocol::Imap => Selection::of(account).fixed(),
    }
}

/// The personal namespace's prefix, if the server named one.
pub fn personal_prefix(namespaces: &[Namespace]) -> Option<String> {
    namespaces
        .first()
        .map(|n| n.prefix.clone())
        .filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(name: &str, delim: char, attrs: &[&str]) -> Folder {
        Folder {
            name: name.into(),
            delimiter: Some(delim),
            attributes: attrs.iter().map(|a| a.to_ascii_lowercase()).collect(),
        }
    }

    fn selection(include: &[&str], exclude: &[&str], watch: &[&str], max: usize) -> Selection {
        let p = |l: &[&str]| -> Vec<(String, Selector)> {
            l.iter()
                .map(|s| (s.to_string(), Selector::parse(s).unwrap()))
                .collect()
        };
        Selection {
            include: p(include),
            exclude: p(exclude),
            watch: p(watch).into_iter().map(|(_, s)| s).collect(),
            max_connections: max,
        }
    }

    #[test]
    fn selectors_parse_and_refuse_what_is_not_one() {
        assert_eq!(Selector::parse("*"), Ok(Selector::Every));
        assert_eq!(
            Selector::parse("\\SENT"),
            Ok(Selector::Use("\\sent".into()))
        );
        assert_eq!(
            Selector::parse("Projects/*"),
            Ok(Selector::Glob(vec!["Projects".into(), "*".into()]))
        );
        assert_eq!(
            Selector::parse("已发送"),
            Ok(Selector::Name("已发送".into()))
        );
        assert!(Selector::parse("\\Important")
            .unwrap_err()
            .contains("special-use"));
        assert!(Selector::parse("a//*").is_err());
        assert!(Selector::parse("").is_err());
    }

    #[test]
    fn globs_follow_the_servers_delimiter_and_namespace() {
        let one = Selector::parse("Projects/*").unwrap();
        let deep = Selector::parse("Archive/**").unwrap();
        assert!(one.matches(&folder("Projects.a", '.', &[]), None));
        assert!(!one.matches(&folder("Projects.a.b", '.', &[]), None));
        assert!(!one.matches(&folder("Projects", '.', &[]), None));
        assert!(deep.matches(&folder("Archive/2024/03", '/', &[]), None));
        assert!(
            deep.matches(&folder("Archive", '/', &[]), None),
            "** matches zero levels too"
        );
        assert!(one.matches(&folder("INBOX.Projects.x", '.', &[]), Some("INBOX.")));
        assert!(!one.matches(&folder("INBOX.Projects.x", '.', &[]), None));
        assert!(Selector::parse("Pro?ects/a*c")
            .unwrap()
            .matches(&folder("Projects/abbc", '/', &[]), None));
        assert!(Selector::parse("*")
            .unwrap()
            .matches(&folder("a.b.c", '.', &[]), None));
        assert!(Selector::parse("已*")
            .unwrap()
            .matches(&folder("已发送", '.', &[]), None));
    }

    #[test]
    fn names_may_leave_out_the_namespace_and_write_slash_for_the_delimiter() {
        let courier = |n: &str| folder(n, '.', &[]);
        let name = |t: &str| Selector::parse(t).unwrap();
        assert!(name("已发送").matches(&courier("INBOX.已发送"), Some("INBOX.")));
        assert!(name("Archive/2024").matches(&courier("INBOX.Archive.2024"), Some("INBOX.")));
        assert!(name("Archive/2024").matches(&courier("Archive.2024"), None));
        assert!(!name("Archive").matches(&courier("INBOX.Archive.2024"), Some("INBOX.")));
        assert!(name("inbox").matches(&courier("INBOX"), Some("INBOX.")));
    }

    #[test]
    fn inbox_keeps_the_configs_spelling() {
        let s = selection(&["Inbox", "Sent"], &[], &["INBOX"], 5);
        let plan = s.plan(&[folder("INBOX", '.', &[]), folder("Sent", '.', &[])], None);
        assert_eq!(plan.synced.get("Inbox"), Some(&Follow::Watch), "{plan:?}");
        assert!(!plan.synced.contains_key("INBOX"));
    }

    #[test]
    fn every_folder_but_junk_trash_and_the_unselectable() {
        let s = selection(&["*"], &["\\Junk", "\\Trash"], &["INBOX"], 5);
        let listed = vec![
            folder("INBOX", '.', &[]),
            folder("Sent", '.', &["\\Sent"]),
            folder("Junk", '.', &["\\Junk"]),
            folder("Trash", '.', &["\\Trash", "\\HasNoChildren"]),
            folder("Parent", '.', &["\\Noselect"]),
            folder("Parent.child", '.', &[]),
            folder("Gone", '.', &["\\NonExistent"]),
        ];
        let plan = s.plan(&listed, None);
        assert_eq!(
            plan.synced.keys().collect::<Vec<_>>(),
            ["INBOX", "Parent.child", "Sent"]
        );
        assert_eq!(plan.synced["INBOX"], Follow::Watch);
        assert_eq!(plan.synced["Sent"], Follow::Shared);
        assert!(
            plan.left_out["Junk"].contains("\\\\Junk"),
            "{:?}",
            plan.left_out
        );
        assert!(plan.left_out["Parent"].contains("Noselect"));
        assert!(plan.left_out["Gone"].contains("NonExistent"));
    }

    #[test]
    fn a_literal_name_beats_the_exclusions_and_is_kept_when_unlisted() {
        let s = selection(&["*", "Junk", "Hidden"], &["\\Junk"], &["INBOX"], 5);
        let plan = s.plan(
            &[folder("INBOX", '.', &[]), folder("Junk", '.', &["\\Junk"])],
            None,
        );
        assert!(plan.synced.contains_key("Junk"));
        assert!(plan.synced.contains_key("Hidden"));
    }

    #[test]
    fn watch_never_exceeds_max_connections() {
        let s = selection(&["*"], &[], &["*"], 3);
        let listed: Vec<Folder> = (0..6)
            .map(|i| folder(&format!("f{i}"), '.', &[]))
            .chain([folder("INBOX", '.', &[])])
            .collect();
        let plan = s.plan(&listed, None);
        let watched: Vec<_> = plan.watched().collect();
        assert_eq!(
            watched.len(),
            2,
            "3 connections: 2 watched + the shared one"
        );
        assert!(
            watched.contains(&&"INBOX".to_string()),
            "INBOX is watched first"
        );
        assert_eq!(plan.demoted.len(), 5);
        assert_eq!(plan.shared().count(), 5);
        // everything watched: the account task's own connection still counts
        let s = selection(&["*"], &[], &["*"], 7);
        let plan = s.plan(&listed, None);
        assert_eq!(plan.watched().count(), 6);
    }

    #[test]
    fn fixed_accounts_keep_one_connection_per_named_folder() {
        assert_eq!(
            selection(&["INBOX"], &[], &["INBOX"], 5).fixed(),
            Some(vec!["INBOX".into()])
        );
        assert_eq!(
            selection(&["INBOX", "Sent"], &[], &["INBOX"], 5).fixed(),
            None
        );
        assert!(selection(&["INBOX", "Sent"], &[], &["*"], 5)
            .fixed()
            .is_some());
        assert_eq!(selection(&["INBOX", "Sent"], &[], &["*"], 1).fixed(), None);
        assert_eq!(selection(&["\\Sent"], &[], &["*"], 5).fixed(), None);
    }

    #[test]
    fn special_use_selects_by_attribute() {
        let s = selection(&["\\Sent", "\\All"], &[], &["INBOX"], 5);
        let plan = s.plan(
            &[
                folder("INBOX", '/', &[]),
                folder("[Gmail]/Sent Mail", '/', &["\\Sent"]),
                folder("[Gmail]/All Mail", '/', &["\\All"]),
                folder("Work", '/', &[]),
            ],
            None,
        );
        assert_eq!(
            plan.synced.keys().collect::<Vec<_>>(),
            ["[Gmail]/All Mail", "[Gmail]/Sent Mail"]
        );
    }
}
