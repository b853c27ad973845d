//! Model ids of the paper's grid: `LLxDDDD_EEcS@K`, e.g. `02x0768_01d05@0` =
//! 2 layers, width 768, 1 epoch, weight-decay code d (n = 0, d = 5e-4,
//! L = 0.1), seed 05, checkpoint index 0.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct GridId {
    pub depth: u32,
    pub width: u32,
    pub epochs: u32,
    pub weight_decay: f64,
    pub seed: u32,
    pub checkpoint: Option<i32>,
}

/// The weight decay a code letter stands for.
pub fn decay_of_code(c: char) -> Option<f64> {
    match c {
        'n' => Some(0.0),
        'd' => Some(5e-4),
        'L' => Some(0.1),
        _ => None,
    }
}

/// The code letter of a weight decay, if it has one.
pub fn code_of_decay(wd: f64) -> Option<char> {
    ['n', 'd', 'L']
        .into_iter()
        .find(|&c| decay_of_code(c).is_some_and(|x| (x - wd).abs() <= 1e-12 * x.max(1e-12)))
}

/// Parse `LLxDDDD_EEcS[@K]`; `None` for ids of another form.
pub fn parse(id: &str) -> Option<GridId> {
    let (base, ck) = match id.rsplit_once('@') {
        Some((b, k)) => (b, Some(k.parse::<i32>().ok()?)),
        None => (id, None),
    };
    let (ll, rest) = base.split_once('x')?;
    let (dddd, rest) = rest.split_once('_')?;
    let pos = rest.find(|c: char| !c.is_ascii_digit())?;
    let (ee, rest) = rest.split_at(pos);
    let mut chars = rest.chars();
    let code = chars.next()?;
    let ss = chars.as_str();
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    if !(digits(ll) && digits(dddd) && digits(ee) && digits(ss)) {
        return None;
    }
    Some(GridId {
        depth: ll.parse().ok()?,
        width: dddd.parse().ok()?,
        epochs: ee.parse().ok()?,
        weight_decay: decay_of_code(code)?,
        seed: ss.parse().ok()?,
        checkpoint: ck,
    })
}

/// The grid name of a training recipe (no checkpoint index).
pub fn format(depth: usize, width: usize, epochs: usize, weight_decay: f64, seed: u64) -> Result<String> {
    let code = code_of_decay(weight_decay).ok_or_else(|| {
        Error::invalid(format!(
            "weight decay {weight_decay} has no code in the LLxDDDD_EEcS naming scheme (n = 0, d = 5e-4, L = 0.1); give name= explicitly"
        ))
    })?;
    Ok(format!("{depth:02}x{width:04}_{epochs:02}{code}{seed:02}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_ids_parse_and_format() {
        let g = parse("02x0768_01d05@0").unwrap();
        assert_eq!(
            g,
            GridId {
                depth: 2,
                width: 768,
                epochs: 1,
                weight_decay: 5e-4,
                seed: 5,
                checkpoint: Some(0)
            }
        );
        assert_eq!(format(2, 768, 1, 5e-4, 5).unwrap(), "02x0768_01d05");
        assert_eq!(parse("12x1024_10L20").unwrap().weight_decay, 0.1);
        assert_eq!(parse("01x0064_03n00@2").unwrap().checkpoint, Some(2));
        assert!(parse("TinyStories-1M").is_none());
        assert!(parse("02x0768_01q05").is_none());
        assert!(format(1, 64, 1, 0.01, 0).is_err());
    }
}
