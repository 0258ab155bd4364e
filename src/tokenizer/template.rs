//! The bundle's own chat template, rendered the way transformers' `apply_chat_template` does.
//!
//! transformers renders with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls) plus a few
//! globals: `raise_exception`, `strftime_now`, and a `tojson` filter that is Python's
//! `json.dumps` (", " and ": " separators, non-ASCII kept). minijinja's own `tojson` is compact
//! and HTML-safe, so Qwen2.5 tool sections would differ byte for byte: we replace it.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value as Json;

const NAME: &str = "chat";

pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // `.strip()`, `.startswith()`, `.items()`, … on strings and dicts, as Python offers them.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())?;
        Ok(Self { env })
    }

    /// Renders `messages` (and `tools`, when given) with the extra variables transformers
    /// passes: `add_generation_prompt` and the special-token strings (`bos_token`, …).
    /// `messages` is a list of [`ChatMessage`](crate::chat::ChatMessage)s, or any JSON list of
    /// message objects (tool calls and all), passed to the template as given.
    pub fn render<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        special_tokens: &[(String, String)],
    ) -> Result<String, Error> {
        let special: serde_json::Map<String, Json> = special_tokens
            .iter()
            .map(|(name, value)| (name.clone(), Json::String(value.clone())))
            .collect();
        let ctx = RenderContext {
            special,
            messages,
            tools,
            documents: None,
            add_generation_prompt,
        };
        let template = self.env.get_template(NAME)?;
        template.render(Value::from_serialize(&ctx))
    }
}

/// The variables a chat template sees, as transformers passes them.
#[derive(Serialize)]
struct RenderContext<'a, M: ?Sized> {
    /// `bos_token`, `eos_token`, … by name.
    #[serde(flatten)]
    special: serde_json::Map<String, Json>,
    messages: &'a M,
    tools: Option<&'a Json>,
    /// Retrieval documents: never given.
    documents: Option<()>,
    add_generation_prompt: bool,
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "tojson: value is not JSON").with_source(e)
    })?;
    let style = PyJson {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` output format.
struct PyJson {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, v: &Json, level: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, Some(f)) => out.push_str(&py_float(f)),
                _ => out.push_str(&n.to_string()),
            },
            Json::String(s) => self.string(s, out),
            Json::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separator(i, level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.close(level, out);
                out.push(']');
            }
            Json::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    self.separator(i, level + 1, out);
                    self.string(key, out);
                    out.push_str(": ");
                    self.write(item, level + 1, out);
                }
                self.close(level, out);
                out.push('}');
            }
        }
    }

    /// Python uses ", " between items without indent, and "," + newline with it.
    fn separator(&self, index: usize, level: usize, out: &mut String) {
        match self.indent {
            None => {
                if index > 0 {
                    out.push_str(", ");
                }
            }
            Some(width) => {
                if index > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&" ".repeat(width * level));
            }
        }
    }

    fn close(&self, level: usize, out: &mut String) {
        if let Some(width) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, scientific outside [1e-4, 1e16).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{f:e}"); // shortest digits, e.g. "1.5e-7"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let plain = format!("{f}");
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// `datetime.now().strftime(format)` for the directives chat templates use (dates in UTC:
/// an edge box's local zone is not known without a time-zone database).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

fn strftime(unix_secs: i64, format: &str) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(v: Json, indent: Option<usize>) -> String {
        let mut out = String::new();
        PyJson {
            indent,
            ensure_ascii: false,
            sort_keys: false,
        }
        .write(&v, 0, &mut out);
        out
    }

    #[test]
    fn python_json_format() {
        let v: Json = serde_json::from_str(
            r#"{"b": 1, "a": [1.5, "x\"y\n", null, true], "c": {}, "d": "你好"}"#,
        )
        .unwrap();
        assert_eq!(
            dumps(v.clone(), None),
            r#"{"b": 1, "a": [1.5, "x\"y\n", null, true], "c": {}, "d": "你好"}"#
        );
        assert_eq!(
            dumps(v, Some(2)),
            "{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    \"x\\\"y\\n\",\n    null,\n    true\n  ],\n  \"c\": {},\n  \"d\": \"你好\"\n}"
        );
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(0.00001), "1e-05");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(123.25), "123.25");
    }

    #[test]
    fn dates() {
        assert_eq!(strftime(0, "%d %b %Y %A"), "01 Jan 1970 Thursday");
        assert_eq!(
            strftime(1_700_000_000, "%Y-%m-%d %H:%M:%S"),
            "2023-11-14 22:13:20"
        );
    }

    #[test]
    fn jinja_settings_match_transformers() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m.content.strip() }}|{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}{{ bos_token }}{% endif %}",
        )
        .unwrap();
        let messages = serde_json::json!([{"role": "user", "content": " hi "}]);
        let out = t
            .render(&messages, None, true, &[("bos_token".into(), "<s>".into())])
            .unwrap();
        assert_eq!(out, "  hi|{\"role\": \"user\", \"content\": \" hi \"}\n<s>");
        let t = ChatTemplate::new("{{ raise_exception('bad role') }}").unwrap();
        let err = t.render(&messages, None, false, &[]).unwrap_err();
        assert!(err.to_string().contains("bad role"));
    }
}
