//! `csv-decoder`: a decoder plugin for boards that print separated values,
//! `cuisine;21,5;40` — what the built-in line formats do not read. The
//! `columns` parameter names each field: `id` is the sensor id, `-` skips
//! a field, anything else is a quantity (`temperature`, `humidite`…).
//!
//! Parameters: `columns` (default "id,temperature"), `separator` (default ";").

use std::cell::RefCell;

wit_bindgen::generate!({ world: "decoder-plugin", path: "../../wit" });

use exports::capteurs::plugins::decoder::{Guest, Param, Reading};

#[derive(Debug, Clone, PartialEq)]
pub struct Csv {
    columns: Vec<String>,
    separator: char,
}

impl Csv {
    pub fn parse(params: &[(String, String)]) -> Result<Self, String> {
        let mut c = Csv {
            columns: vec!["id".into(), "temperature".into()],
            separator: ';',
        };
        for (k, v) in params {
            match k.as_str() {
                "columns" => c.columns = v.split(',').map(|s| s.trim().to_owned()).collect(),
                "separator" => {
                    let mut chars = v.chars();
                    c.separator = match (chars.next(), chars.next()) {
                        (Some(ch), None) => ch,
                        _ => return Err(format!("separator = {v:?}: one character")),
                    }
                }
                _ => return Err(format!("unknown parameter {k:?} (columns, separator)")),
            }
        }
        Ok(c)
    }

    /// (sensor id, [(quantity, value)]) of one line.
    pub fn decode(&self, line: &str) -> Result<(Option<String>, Vec<(String, f64)>), String> {
        let fields: Vec<&str> = line.trim().split(self.separator).collect();
        if fields.len() != self.columns.len() {
            return Err(format!(
                "{} fields, {} columns expected",
                fields.len(),
                self.columns.len()
            ));
        }
        let mut id = None;
        let mut values = Vec::new();
        for (col, field) in self.columns.iter().zip(fields) {
            match col.as_str() {
                "id" => id = Some(field.trim().to_owned()),
                "-" => {}
                q => {
                    let v: f64 = field
                        .trim()
                        .replace(',', ".")
                        .parse()
                        .map_err(|_| format!("{q}: {field:?} is not a number"))?;
                    values.push((q.to_owned(), v));
                }
            }
        }
        Ok((id, values))
    }
}

thread_local! {
    static CSV: RefCell<Option<Csv>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(params: Vec<Param>) -> Result<(), String> {
        let p: Vec<(String, String)> = params.into_iter().map(|p| (p.key, p.value)).collect();
        let c = Csv::parse(&p)?;
        CSV.with(|s| *s.borrow_mut() = Some(c));
        Ok(())
    }

    fn decode(_source: String, data: Vec<u8>) -> Result<Vec<Reading>, String> {
        let line = String::from_utf8(data).map_err(|_| "not UTF-8".to_string())?;
        let (id, values) = CSV.with(|c| {
            c.borrow()
                .as_ref()
                .ok_or("not initialised".to_string())?
                .decode(&line)
        })?;
        Ok(values
            .into_iter()
            .map(|(grandeur, value)| Reading {
                sensor: id.clone(),
                grandeur,
                value,
            })
            .collect())
    }
}

#[cfg(target_arch = "wasm32")]
export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separated_values() {
        let c = Csv::parse(&[("columns".into(), "id,temperature,-,humidite".into())]).unwrap();
        let (id, v) = c.decode("cuisine;21,5;x;40\r").unwrap();
        assert_eq!(id.as_deref(), Some("cuisine"));
        assert_eq!(
            v,
            [
                ("temperature".to_string(), 21.5),
                ("humidite".to_string(), 40.0)
            ]
        );
        assert!(c.decode("cuisine;21,5").is_err());
        assert!(c.decode("cuisine;chaud;x;40").is_err());
        assert!(Csv::parse(&[("separator".into(), ";;".into())]).is_err());
    }
}
