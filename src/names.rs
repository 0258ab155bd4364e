//! Enums spelled as words in configs, flags and messages: one declaration gives the variants,
//! their names, `FromStr` (whose error lists the names), `Display`, and serde as the name.

/// `named_enum! { pub enum Kind("kind") { A = "a", B = "b" | "alias" } }`.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal $(| $alias:literal)*),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The name configs, flags and messages use.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text $(| $alias)* => Ok(Self::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?} (expected {})",
                        $what,
                        $crate::names::one_of(&[$($text),+])
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// `["a", "b", "c"]` → "a, b or c".
pub fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    named_enum! {
        enum Shade("shade") {
            Light = "light" | "pale",
            Dark = "dark",
        }
    }

    #[test]
    fn names_parse_print_and_serialize() {
        assert_eq!("pale".parse::<Shade>(), Ok(Shade::Light));
        assert_eq!(Shade::Dark.to_string(), "dark");
        let err = "grey".parse::<Shade>().unwrap_err();
        assert_eq!(err, "unknown shade \"grey\" (expected light or dark)");
        assert_eq!(serde_json::to_string(&Shade::Light).unwrap(), "\"light\"");
        let back: Shade = serde_json::from_str("\"dark\"").unwrap();
        assert_eq!(back, Shade::Dark);
        assert_eq!(one_of(&["a", "b", "c"]), "a, b or c");
    }
}
