//! Model ids of the paper's grid: `LLxDDDD_EEc[S]@K`, e.g. `02x0768_01d05@0` =
//! 2 layers, width 768, 1 epoch, weight-decay code d (n = 0, d = 5e-4,
//! L = 0.1), seed 05, checkpoint index 0. The seed digits are absent for the
//! run with the default seed (`02x0768_01d@0`, most of the paper's published
//! ids); such an id parses with `seed = None`, which is not seed 0.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct GridId {
    pub depth: u32,
    pub width: u32,
    pub epochs: u32,
    pub weight_decay: f64,
    /// `None` for the default-seed run, whose id has no seed digits.
    pub seed: Option<u32>,
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

/// Parse `LLxDDDD_EEc[S][@K]`; `None` for ids of another form.
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
    if !(digits(ll) && digits(dddd) && digits(ee) && (ss.is_empty() || digits(ss))) {
        return None;
    }
    Some(GridId {
        depth: ll.parse().ok()?,
        width: dddd.parse().ok()?,
        epochs: ee.parse().ok()?,
        weight_decay: decay_of_code(code)?,
        seed: if ss.is_empty() {
            None
        } else {
            Some(ss.parse().ok()?)
        },
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
                seed: Some(5),
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

    /// Every shape of the paper's published ids: with and without seed
    /// digits, all three decay codes, with and without `@K`.
    #[test]
    fn every_published_id_shape_parses() {
        for (code, wd) in [('n', 0.0), ('d', 5e-4), ('L', 0.1)] {
            for seed in ["", "0", "05", "17"] {
                for ck in ["", "@0", "@3"] {
                    let id = format!("04x0256_03{code}{seed}{ck}");
                    let g = parse(&id).unwrap_or_else(|| panic!("{id} did not parse"));
                    assert_eq!((g.depth, g.width, g.epochs), (4, 256, 3), "{id}");
                    assert_eq!(g.weight_decay, wd, "{id}");
                    let want_seed = (!seed.is_empty()).then(|| seed.parse::<u32>().unwrap());
                    assert_eq!(g.seed, want_seed, "{id}");
                    let want_ck = ck.strip_prefix('@').map(|k| k.parse::<i32>().unwrap());
                    assert_eq!(g.checkpoint, want_ck, "{id}");
                }
            }
        }
        // No seed digits is not seed 0.
        assert_eq!(parse("02x0768_01d@0").unwrap().seed, None);
        assert_eq!(parse("02x0768_01d00@0").unwrap().seed, Some(0));
        for bad in [
            "02x0768_01@0",
            "02x0768_d05",
            "x0768_01d05",
            "02x0768_01d05@",
            "02x0768_01d0a",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
