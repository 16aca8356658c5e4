//! containerd's filter syntax, for `List`: containerd asks a remote snapshotter for the committed
//! snapshot of a layer with `labels."containerd.io/snapshot.ref"==CHAINID,parent=="PARENT"`
//! after it answered a layer's Prepare with AlreadyExists, and `ctr snapshots ls` and containerd's
//! garbage collector list with filters too.
//!
//! The grammar is containerd's (`filters/parser.go`): a filter is selectors joined by `,`, all of
//! which must match; a list of filters matches when any of them does (no filter: everything).
//!
//! ```text
//! selector  := fieldpath (operator value)?      no operator: the field is present
//! fieldpath := field ('.' field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="               ~= is a regular expression
//! value     := quoted | [^\s,]+                 ~= also takes /regex/ and |regex|
//! ```
//!
//! A snapshot's fields are `kind` (`active`, `view`, `committed`), `name`, `parent` and
//! `labels.KEY`.

use regex_lite::Regex;

/// Filters as `List` gets them: a snapshot passes if any filter matches it.
#[derive(Debug)]
pub struct Filters(Vec<Filter>);

/// Selectors that must all match.
#[derive(Debug)]
struct Filter(Vec<Selector>);

#[derive(Debug)]
struct Selector {
    fieldpath: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// What a filter is matched against: a field's value, or `None` when the object has no such
/// field.
pub trait Fields {
    fn field(&self, path: &[String]) -> Option<String>;
}

impl Filters {
    /// Parses each filter; an empty string matches everything, as in containerd.
    pub fn parse(filters: &[String]) -> Result<Filters, String> {
        filters
            .iter()
            .map(|f| Filter::parse(f).map_err(|e| format!("filter {f:?}: {e}")))
            .collect::<Result<_, _>>()
            .map(Filters)
    }

    pub fn matches(&self, object: &impl Fields) -> bool {
        self.0.is_empty() || self.0.iter().any(|f| f.matches(object))
    }
}

impl Filter {
    fn parse(text: &str) -> Result<Filter, String> {
        let mut p = Parser {
            rest: text.trim_start(),
        };
        let mut selectors = Vec::new();
        if p.rest.is_empty() {
            return Ok(Filter(selectors));
        }
        loop {
            selectors.push(p.selector()?);
            p.skip_space();
            match p.rest.chars().next() {
                None => return Ok(Filter(selectors)),
                Some(',') => p.rest = &p.rest[1..],
                Some(c) => return Err(format!("unexpected {c:?} at {:?}", p.rest)),
            }
        }
    }

    fn matches(&self, object: &impl Fields) -> bool {
        self.0.iter().all(|s| {
            let value = object.field(&s.fieldpath);
            match &s.op {
                Op::Present => value.is_some(),
                Op::Equal(v) => value.as_deref() == Some(v.as_str()),
                Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
                Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
            }
        })
    }
}

struct Parser<'a> {
    rest: &'a str,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let mut fieldpath = vec![self.field()?];
        while let Some(rest) = self.rest.strip_prefix('.') {
            self.rest = rest;
            fieldpath.push(self.field()?);
        }
        self.skip_space();
        if self.rest.is_empty() || self.rest.starts_with(',') {
            return Ok(Selector {
                fieldpath,
                op: Op::Present,
            });
        }
        let end = self
            .rest
            .find(|c| !matches!(c, '=' | '!' | '~'))
            .unwrap_or(self.rest.len());
        let operator = &self.rest[..end];
        self.rest = &self.rest[end..];
        self.skip_space();
        let op = match operator {
            "==" => Op::Equal(self.value(false)?),
            "!=" => Op::NotEqual(self.value(false)?),
            "~=" => {
                let pattern = self.value(true)?;
                Op::Matches(
                    Regex::new(&pattern)
                        .map_err(|e| format!("bad regular expression {pattern:?}: {e}"))?,
                )
            }
            "" => {
                return Err(format!(
                    "expected an operator (==, != or ~=) at {:?}",
                    self.rest
                ))
            }
            other => return Err(format!("unsupported operator {other:?}")),
        };
        Ok(Selector { fieldpath, op })
    }

    fn field(&mut self) -> Result<String, String> {
        self.skip_space();
        if self.rest.starts_with('"') {
            return self.quoted('"');
        }
        let end = self
            .rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.rest.len());
        if end == 0 {
            return Err(format!("expected a field at {:?}", self.rest));
        }
        let field = self.rest[..end].to_string();
        self.rest = &self.rest[end..];
        Ok(field)
    }

    fn value(&mut self, regex: bool) -> Result<String, String> {
        match self.rest.chars().next() {
            Some('"') => self.quoted('"'),
            Some(q @ ('/' | '|')) if regex => self.quoted(q),
            Some('/' | '|') => Err(format!(
                "{:?}: only a regular expression (~=) may be quoted with / or |",
                self.rest
            )),
            _ => {
                let end = self
                    .rest
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(self.rest.len());
                if end == 0 {
                    return Err("expected a value".into());
                }
                let value = self.rest[..end].to_string();
                self.rest = &self.rest[end..];
                Ok(value)
            }
        }
    }

    /// A quoted string after Go's rules for `"` (the escapes containerd's clients write:
    /// `\"`, `\\`, `\n`, `\t`, `\r`, `\xNN`, `\uNNNN`); `/` and `|` quote regular expressions,
    /// in which only `\` + the quote is unescaped.
    fn quoted(&mut self, quote: char) -> Result<String, String> {
        let mut chars = self.rest.char_indices().skip(1);
        let mut out = String::new();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                self.rest = &self.rest[i + c.len_utf8()..];
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some((_, e)) = chars.next() else { break };
            if quote != '"' {
                if e != quote {
                    out.push('\\');
                }
                out.push(e);
                continue;
            }
            match e {
                '"' | '\\' | '\'' => out.push(e),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'x' | 'u' | 'U' => {
                    let digits = match e {
                        'x' => 2,
                        'u' => 4,
                        _ => 8,
                    };
                    let hex: String = chars.by_ref().take(digits).map(|(_, c)| c).collect();
                    let code = u32::from_str_radix(&hex, 16)
                        .ok()
                        .filter(|_| hex.len() == digits)
                        .and_then(char::from_u32)
                        .ok_or_else(|| format!("bad escape \\{e}{hex}"))?;
                    out.push(code);
                }
                other => return Err(format!("unknown escape \\{other}")),
            }
        }
        Err(format!("quoted string not terminated: {}", self.rest))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Snap(HashMap<&'static str, &'static str>);

    impl Fields for Snap {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join(".").as_str()).map(|v| v.to_string())
        }
    }

    fn snap() -> Snap {
        Snap(HashMap::from([
            ("kind", "committed"),
            ("name", "lazy/7/sha256:c1"),
            ("parent", "default/3/sha256:p0"),
            ("labels.containerd.io/snapshot.ref", "sha256:c1"),
        ]))
    }

    fn matches(filters: &[&str]) -> bool {
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        Filters::parse(&filters).unwrap().matches(&snap())
    }

    #[test]
    fn the_filter_containerd_asks_a_remote_snapshotter_with() {
        assert!(matches(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:c1,parent=="default/3/sha256:p0""#
        ]));
        assert!(!matches(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:c1,parent=="default/3/sha256:p1""#
        ]));
        assert!(!matches(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:c1,parent=="""#
        ]));
    }

    #[test]
    fn operators_presence_and_alternatives() {
        assert!(matches(&[]));
        assert!(matches(&[""]));
        assert!(matches(&["kind==committed"]));
        assert!(matches(&["kind!=active"]));
        assert!(!matches(&["kind!=committed"]));
        assert!(matches(&[r#"labels."containerd.io/snapshot.ref""#]));
        assert!(!matches(&["labels.nope"]));
        assert!(matches(&["labels.nope!=x"]));
        assert!(matches(&[r"name~=/^lazy\/[0-9]+\//"]));
        assert!(matches(&["name~=|sha256:c|"]));
        assert!(!matches(&["name~=^default"]));
        assert!(matches(&["kind==active", " kind == committed "]));
        assert!(!matches(&["kind==active", "name==x"]));
    }

    #[test]
    fn bad_filters_are_refused_with_a_reason() {
        for bad in [
            "kind=committed",
            "kind==",
            "==x",
            r#"name=="open"#,
            "name==/x/",
            "name~=(",
            "kind==a b",
            r#"name=="\q""#,
        ] {
            let err = Filters::parse(&[bad.to_string()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
