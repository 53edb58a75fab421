//! What an option is, once: [`Opt`], a row of a table ([`super::OPTIONS`] for the
//! gateway's settings, [`super::LIMITS`] for its bounds), from which the CLI's arguments,
//! the config file's keys, the `TETHER_*` variables, the per-server settings and the
//! README's tables all come. [`Values`] holds what one layer sets (a map checked against
//! its table), [`Reader`] reads it back by row, every problem under the row's key.
//!
//! Must not: accept a key no row names, or know what any one option means.

use std::marker::PhantomData;

use serde::de::{self, Deserializer};

use super::*;

/// What an option is when it is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// This value (parsed like a set one).
    Is(&'static str),
    /// Computed from other options, or a place (the text says how or where).
    Derived(&'static str),
    /// Not set: off, or nothing.
    None,
}

/// Where an option is written besides its flag and its variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A top-level key of the config file, named like the flag.
    Top,
    /// A key of the config file's `[upstream]` table (as the README shows it).
    Upstream(&'static str),
    /// A key of the config file's `[limits]` table, named like the flag.
    Limits,
    /// The command line and the environment only.
    Cli,
}

/// How the flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value.
    One,
    /// One of these values.
    Choice(&'static [&'static str]),
    /// A switch (`--demo`); its variable takes `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`.
    Switch,
    /// A comma-separated list (the flag repeatable).
    List,
    /// Repeatable; the variable holds one per line.
    Lines,
    /// One value that is a secret: its variable's value is never shown in help.
    Secret,
}

/// One option: everything the CLI, the config file, the environment, the per-server
/// settings and the README know of it.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// The flag's name (`--KEY`), and the file's key where [`Opt::place`] says so.
    pub key: &'static str,
    /// The environment variable (`TETHER_` and the key in capitals, unless told otherwise).
    pub env: &'static str,
    /// The value's name in help: `DUR`, `N`, `SIZE`, `ADDR`.
    pub value: &'static str,
    /// Its value when not set.
    pub default: Fallback,
    /// Where the config file holds it.
    pub place: Place,
    /// How the flag takes its value.
    pub kind: Kind,
    /// Whether a server's `tether` table may set it for that server.
    pub server: bool,
    /// An earlier name, still read as a flag, a variable (`TETHER_` and it in capitals)
    /// and a key.
    pub alias: Option<&'static str>,
    /// One line for help and the README (Markdown: backticks are dropped in help).
    pub doc: &'static str,
}

impl Opt {
    /// A row of the `[limits]` table.
    pub(super) const fn limit(
        key: &'static str,
        env: &'static str,
        value: &'static str,
        default: Fallback,
        doc: &'static str,
    ) -> Opt {
        Opt {
            key,
            env,
            value,
            default,
            place: Place::Limits,
            kind: Kind::One,
            server: false,
            alias: None,
            doc,
        }
    }

    /// A top-level setting of the config file.
    pub(super) const fn top(
        key: &'static str,
        env: &'static str,
        value: &'static str,
        default: Fallback,
        doc: &'static str,
    ) -> Opt {
        Opt {
            place: Place::Top,
            ..Opt::limit(key, env, value, default, doc)
        }
    }

    pub(super) const fn at(self, place: Place) -> Opt {
        Opt { place, ..self }
    }

    pub(super) const fn kind(self, kind: Kind) -> Opt {
        Opt { kind, ..self }
    }

    pub(super) const fn server(self) -> Opt {
        Opt {
            server: true,
            ..self
        }
    }

    pub(super) const fn alias(self, alias: &'static str) -> Opt {
        Opt {
            alias: Some(alias),
            ..self
        }
    }

    /// The default as help and the README show it.
    pub fn default_text(&self) -> String {
        match self.default {
            Fallback::Is(v) => format!("`{v}`"),
            Fallback::Derived(text) => text.to_owned(),
            Fallback::None => "none".to_owned(),
        }
    }

    /// The variable of its earlier name, when it has one.
    pub fn alias_env(&self) -> Option<String> {
        self.alias
            .map(|a| format!("TETHER_{}", a.to_uppercase().replace('-', "_")))
    }

    /// The flag as the README shows it: `--KEY VALUE`, or `--KEY` for a switch.
    fn flag_text(&self) -> String {
        match self.kind {
            Kind::Switch => format!("`--{}`", self.key),
            _ => format!("`--{} {}`", self.key, self.value),
        }
    }

    /// The README's row for it: flag, variable and default, then for a setting its file
    /// key, then its doc line.
    pub fn readme_row(&self) -> String {
        let earlier = match (self.alias, self.alias_env()) {
            (Some(a), Some(env)) => {
                format!(" (`--{a}` and `{env}`, its earlier names, still work)")
            }
            _ => String::new(),
        };
        let env = match self.kind {
            Kind::Lines => format!("`{}` (one per line)", self.env),
            _ => format!("`{}`", self.env),
        };
        let default = match self.default {
            Fallback::None if self.place != Place::Limits => String::new(),
            _ => self.default_text(),
        };
        let file = match self.place {
            Place::Limits => {
                return format!(
                    "| {} | {env} | {default} | {}{earlier} |",
                    self.flag_text(),
                    self.doc
                );
            }
            Place::Top => format!("`{}`", self.key),
            Place::Upstream(k) => format!("`[upstream] {k}`"),
            Place::Cli => String::new(),
        };
        format!(
            "| {} | {env} | {file} | {default} | {}{earlier} |",
            self.flag_text(),
            self.doc
        )
        // Empty cells as the hand-written rows write them.
        .replace("|  |", "| |")
        .replace("|  |", "| |")
    }

    /// Its help text: the doc line and the default, without Markdown.
    pub fn help(&self) -> String {
        let text = match self.default {
            Fallback::None => self.doc.to_owned(),
            _ => format!("{} [default: {}]", self.doc, self.default_text()),
        };
        text.replace('`', "").replace("\\|", "|")
    }
}

/// A value as the file writes it (a number, text, a switch, a list), or as a flag or a
/// variable gives it (text, a switch, a list); each option reads it its own way.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OptValue {
    /// A whole number (`4194304`, `1000`).
    Number(u64),
    /// Text (`"4MiB"`, `"30s"`, and every single value from a flag or a variable).
    Text(String),
    /// A switch (`demo = true`, `--demo`).
    Switch(bool),
    /// A list (`allowed-origins = ["https://a"]`, a comma-separated flag).
    List(Vec<String>),
}

impl From<u64> for OptValue {
    fn from(n: u64) -> OptValue {
        OptValue::Number(n)
    }
}

impl From<&str> for OptValue {
    fn from(t: &str) -> OptValue {
        OptValue::Text(t.to_owned())
    }
}

impl From<String> for OptValue {
    fn from(t: String) -> OptValue {
        OptValue::Text(t)
    }
}

impl From<bool> for OptValue {
    fn from(b: bool) -> OptValue {
        OptValue::Switch(b)
    }
}

impl From<Vec<String>> for OptValue {
    fn from(l: Vec<String>) -> OptValue {
        OptValue::List(l)
    }
}

/// A table of options: the rows a [`Values`] may hold.
pub trait Rows {
    /// The rows.
    fn rows() -> &'static [Opt];

    /// The keys its file section may hold, for serde's "expected one of" message.
    fn file_keys() -> &'static [&'static str];

    /// The row of `key` (or of its earlier name).
    fn row(key: &str) -> Option<&'static Opt> {
        Self::rows()
            .iter()
            .find(|o| o.key == key || o.alias == Some(key))
    }
}

/// What one layer sets of a table's options, by key (each the key of a row of `R`);
/// overlaid, a higher layer's value wins.
pub struct Values<R> {
    map: BTreeMap<&'static str, OptValue>,
    rows: PhantomData<R>,
}

impl<R> Default for Values<R> {
    fn default() -> Values<R> {
        Values {
            map: BTreeMap::new(),
            rows: PhantomData,
        }
    }
}

impl<R> Clone for Values<R> {
    fn clone(&self) -> Values<R> {
        Values {
            map: self.map.clone(),
            rows: PhantomData,
        }
    }
}

impl<R> PartialEq for Values<R> {
    fn eq(&self, other: &Values<R>) -> bool {
        self.map == other.map
    }
}

impl<R> std::fmt::Debug for Values<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.map.fmt(f)
    }
}

impl<R: Rows> Values<R> {
    /// This layer with `key` set to `value`. Panics on a key no row names: callers pass
    /// literals (tests, a server's settings).
    pub fn with(mut self, key: &str, value: impl Into<OptValue>) -> Values<R> {
        let row = R::row(key).unwrap_or_else(|| panic!("no option is named {key:?}"));
        self.map.insert(row.key, value.into());
        self
    }

    /// Sets `key` (a flag or a variable's value); `false` when no row names it.
    pub fn set(&mut self, key: &str, value: OptValue) -> bool {
        match R::row(key) {
            Some(row) => {
                self.map.insert(row.key, value);
                true
            }
            None => false,
        }
    }

    /// Sets `key` from text; `false` when no row names it.
    pub fn set_text(&mut self, key: &str, text: String) -> bool {
        self.set(key, OptValue::Text(text))
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The value set for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&OptValue> {
        self.map.get(key)
    }

    /// The value set for `key` as text (a number as its digits), if any.
    pub fn text(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            OptValue::Text(t) => Some(t.clone()),
            OptValue::Number(n) => Some(n.to_string()),
            OptValue::Switch(b) => Some(b.to_string()),
            OptValue::List(l) => Some(l.join(",")),
        }
    }

    /// The switch set for `key`, if any (text such as `1` or `off` read as a variable is).
    pub fn switch(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            OptValue::Switch(b) => Some(*b),
            OptValue::Number(n) => Some(*n != 0),
            OptValue::Text(t) => Some(matches!(
                t.to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on" | "y"
            )),
            OptValue::List(_) => None,
        }
    }

    /// The list set for `key`, if any (text is one item).
    pub fn list(&self, key: &str) -> Option<Vec<String>> {
        match self.get(key)? {
            OptValue::List(l) => Some(l.clone()),
            OptValue::Text(t) => Some(vec![t.clone()]),
            _ => None,
        }
    }

    /// Sets `key` to `value`, or unsets it.
    pub(super) fn replace(&mut self, key: &'static str, value: Option<OptValue>) {
        match value {
            Some(v) => self.map.insert(key, v),
            None => self.map.remove(key),
        };
    }

    pub(super) fn overlay(mut self, over: Values<R>) -> Values<R> {
        self.map.extend(over.map);
        self
    }

    /// Takes one file key's value; `Err` when no row of `R` is written there.
    pub(super) fn insert_file_key(&mut self, key: &str, value: OptValue) -> Result<(), ()> {
        match R::row(key) {
            Some(row) if matches!(row.place, Place::Top | Place::Limits) => {
                self.map.insert(row.key, value);
                Ok(())
            }
            _ => Err(()),
        }
    }
}

impl<'de, R: Rows> Deserialize<'de> for Values<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Values<R>, D::Error> {
        let raw = BTreeMap::<String, OptValue>::deserialize(d)?;
        let mut values = Values::default();
        for (k, v) in raw {
            values
                .insert_file_key(&k, v)
                .map_err(|()| de::Error::unknown_field(&k, R::file_keys()))?;
        }
        Ok(values)
    }
}

/// Reads one layer's values by row, reporting every problem under the row's key.
pub(super) struct Reader<'a, R> {
    pub(super) layer: &'a Values<R>,
    pub(super) errors: &'a mut Vec<String>,
}

impl<R: Rows> Reader<'_, R> {
    /// The row's literal default (rows resolved here all have one unless `derived` is given).
    fn fallback(key: &str) -> Option<&'static str> {
        match R::row(key).map(|o| o.default) {
            Some(Fallback::Is(v)) => Some(v),
            _ => None,
        }
    }

    /// A whole number, `derived` when not set (for a row whose default is computed). A
    /// value that is not a number is reported and read as the default, so that it is the
    /// one problem reported for it (not also every bound derived from it).
    pub(super) fn number(&mut self, key: &str, derived: Option<u64>) -> u64 {
        let fallback = derived.unwrap_or_else(|| {
            Self::fallback(key)
                .and_then(|v| v.parse().ok())
                .expect("a number row with a literal default")
        });
        match self.layer.get(key) {
            None => fallback,
            Some(OptValue::Number(n)) => *n,
            Some(OptValue::Text(t)) => t.trim().parse::<u64>().unwrap_or_else(|_| {
                self.errors
                    .push(format!("{key}: {t:?} is not a whole number"));
                fallback
            }),
            Some(other) => {
                self.errors
                    .push(format!("{key}: {other:?} is not a whole number"));
                fallback
            }
        }
    }

    /// A whole number greater than zero.
    pub(super) fn positive(&mut self, key: &str, derived: Option<u64>) -> u64 {
        let n = self.number(key, derived);
        if n == 0 {
            self.errors
                .push(format!("{key}: must be greater than zero"));
        }
        n
    }

    pub(super) fn count(&mut self, key: &str, derived: Option<usize>) -> usize {
        usize::try_from(self.positive(key, derived.map(|d| d as u64))).unwrap_or(usize::MAX)
    }

    pub(super) fn rate(&mut self, key: &str) -> u32 {
        u32::try_from(self.positive(key, None)).unwrap_or(u32::MAX)
    }

    pub(super) fn duration(&mut self, key: &str) -> Duration {
        let text = match self.layer.get(key) {
            Some(OptValue::Text(t)) => Some(t.as_str()),
            Some(OptValue::Number(n)) => {
                self.errors
                    .push(format!("{key}: {n} is not a duration like 30s or 5m"));
                return Duration::ZERO;
            }
            Some(other) => {
                self.errors
                    .push(format!("{key}: {other:?} is not a duration like 30s or 5m"));
                return Duration::ZERO;
            }
            None => None,
        };
        let default = Self::fallback(key).expect("a duration row has a default");
        duration(self.errors, key, text, default)
    }

    pub(super) fn size(&mut self, key: &str) -> usize {
        let default = Self::fallback(key).expect("a size row has a default");
        size(self.errors, key, self.layer.get(key), default)
    }

    pub(super) fn text(&self, key: &str) -> Option<&str> {
        match self.layer.get(key) {
            Some(OptValue::Text(t)) => Some(t),
            _ => None,
        }
    }
}
