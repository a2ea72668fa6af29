//! Hand-rolled argv parsing: the binary ships inside minimal images and must stay dependency-free.

use std::collections::HashMap;

/// Flags of one subcommand, `--name value` pairs only.
pub struct Flags {
    values: HashMap<String, String>,
}

impl Flags {
    /// Parses `--name value` pairs; every flag must be in `known` so typos fail loudly
    /// instead of silently running a test with defaults.
    pub fn parse(args: &[String], known: &[&str]) -> Result<Flags, String> {
        let mut values = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let name = arg
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => {
                    let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                    (name.to_string(), v.clone())
                }
            };
            if !known.contains(&name.as_str()) {
                return Err(format!("unknown flag --{name}"));
            }
            values.insert(name, value);
        }
        Ok(Flags { values })
    }

    pub fn opt(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("--{name}: cannot parse {v:?}")),
        }
    }

    pub fn req_num<T: std::str::FromStr>(&self, name: &str) -> Result<T, String> {
        self.num(name)?
            .ok_or_else(|| format!("--{name} is required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_pairs_and_equals() {
        let f = Flags::parse(&s(&["--port", "7", "--addr=1.2.3.4:5"]), &["port", "addr"]).unwrap();
        assert_eq!(f.req_num::<u16>("port").unwrap(), 7);
        assert_eq!(f.opt("addr"), Some("1.2.3.4:5"));
    }

    #[test]
    fn rejects_unknown_and_missing_value() {
        assert!(Flags::parse(&s(&["--nope", "1"]), &["port"]).is_err());
        assert!(Flags::parse(&s(&["--port"]), &["port"]).is_err());
        assert!(Flags::parse(&s(&["port"]), &["port"]).is_err());
    }
}
