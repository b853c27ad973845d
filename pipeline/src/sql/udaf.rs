//! Aggregate functions for cross-model statistics, registered with every
//! session, so the tests of significance stay in SQL and cost O(rows) memory.
//! Each collects a group's (x, y) pairs and hands them to
//! [`lc_metrics::correlation`], where the statistics are defined:
//!
//! - `perm_pvalue(x, y, n, seed)`: permutation test of R^2 = corr(x, y)^2;
//! - `spearman(x, y)`: Spearman's rank correlation;
//! - `r2_bootstrap(x, y, n, seed, q)`: the q-quantile of R^2 over `n` seeded
//!   bootstrap resamples.
//!
//! Rows where x or y is NULL or NaN are left out; fewer than 3 pairs, or a
//! constant x or y, give NULL; a seed gives the same answer whatever order
//! the rows arrive in.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::{Accumulator, Volatility, create_udaf};
use lc_metrics::correlation::{perm_pvalue, r2_bootstrap, spearman};

/// Which statistic an accumulator computes at the end.
#[derive(Debug, Clone, Copy)]
enum Kind {
    PermPvalue,
    Spearman,
    Bootstrap,
}

/// Collects the (x, y) pairs of a group and the constant arguments.
#[derive(Debug)]
struct PairsAccumulator {
    kind: Kind,
    xs: Vec<f64>,
    ys: Vec<f64>,
    n: Option<i64>,
    seed: Option<i64>,
    q: Option<f64>,
}

fn first_i64(a: &ArrayRef) -> Option<i64> {
    let a = a.as_primitive_opt::<Int64Type>()?;
    (0..a.len()).find(|&i| a.is_valid(i)).map(|i| a.value(i))
}

fn first_f64(a: &ArrayRef) -> Option<f64> {
    let a = a.as_primitive_opt::<Float64Type>()?;
    (0..a.len()).find(|&i| a.is_valid(i)).map(|i| a.value(i))
}

fn push_pairs(xs: &mut Vec<f64>, ys: &mut Vec<f64>, x: &ArrayRef, y: &ArrayRef) -> Result<()> {
    let (x, y) = (
        x.as_primitive_opt::<Float64Type>()
            .ok_or_else(|| DataFusionError::Plan("x must be DOUBLE".into()))?,
        y.as_primitive_opt::<Float64Type>()
            .ok_or_else(|| DataFusionError::Plan("y must be DOUBLE".into()))?,
    );
    for i in 0..x.len() {
        if x.is_valid(i) && y.is_valid(i) {
            xs.push(x.value(i));
            ys.push(y.value(i));
        }
    }
    Ok(())
}

impl Accumulator for PairsAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        push_pairs(&mut self.xs, &mut self.ys, &values[0], &values[1])?;
        if values.len() > 2 {
            self.n = self.n.or(first_i64(&values[2]));
            self.seed = self.seed.or(first_i64(&values[3]));
        }
        if values.len() > 4 {
            self.q = self.q.or(first_f64(&values[4]));
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let arg = |v: Option<i64>, what: &str| -> Result<u64> {
            match v {
                Some(x) if x >= 0 => Ok(x as u64),
                None => Ok(0),
                Some(x) => Err(DataFusionError::Plan(format!("{what} must be >= 0, not {x}"))),
            }
        };
        let out = match self.kind {
            Kind::PermPvalue => perm_pvalue(&self.xs, &self.ys, arg(self.n, "n")?, arg(self.seed, "seed")?),
            Kind::Spearman => spearman(&self.xs, &self.ys),
            Kind::Bootstrap => r2_bootstrap(
                &self.xs,
                &self.ys,
                arg(self.n, "n")?,
                arg(self.seed, "seed")?,
                self.q.unwrap_or(f64::NAN),
            ),
        };
        Ok(ScalarValue::Float64(out))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + 8 * (self.xs.capacity() + self.ys.capacity())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = |v: &[f64]| {
            let values: Vec<ScalarValue> = v.iter().map(|&x| ScalarValue::Float64(Some(x))).collect();
            ScalarValue::List(ScalarValue::new_list_nullable(&values, &DataType::Float64))
        };
        let mut out = vec![list(&self.xs), list(&self.ys)];
        if matches!(self.kind, Kind::PermPvalue | Kind::Bootstrap) {
            out.push(ScalarValue::Int64(self.n));
            out.push(ScalarValue::Int64(self.seed));
        }
        if matches!(self.kind, Kind::Bootstrap) {
            out.push(ScalarValue::Float64(self.q));
        }
        Ok(out)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let (lx, ly) = (states[0].as_list::<i32>(), states[1].as_list::<i32>());
        for i in 0..lx.len() {
            if lx.is_valid(i) && ly.is_valid(i) {
                push_pairs(&mut self.xs, &mut self.ys, &lx.value(i), &ly.value(i))?;
            }
        }
        if states.len() > 2 {
            self.n = self.n.or(first_i64(&states[2]));
            self.seed = self.seed.or(first_i64(&states[3]));
        }
        if states.len() > 4 {
            self.q = self.q.or(first_f64(&states[4]));
        }
        Ok(())
    }
}

pub fn register(ctx: &SessionContext) {
    let list = DataType::List(Arc::new(arrow::datatypes::Field::new(
        "item",
        DataType::Float64,
        true,
    )));
    let f = DataType::Float64;
    let i = DataType::Int64;
    let make = |kind: Kind| -> datafusion::logical_expr::function::AccumulatorFactoryFunction {
        Arc::new(move |_| {
            Ok(Box::new(PairsAccumulator {
                kind,
                xs: Vec::new(),
                ys: Vec::new(),
                n: None,
                seed: None,
                q: None,
            }))
        })
    };
    ctx.register_udaf(create_udaf(
        "perm_pvalue",
        vec![f.clone(), f.clone(), i.clone(), i.clone()],
        Arc::new(f.clone()),
        Volatility::Immutable,
        make(Kind::PermPvalue),
        Arc::new(vec![list.clone(), list.clone(), i.clone(), i.clone()]),
    ));
    ctx.register_udaf(create_udaf(
        "spearman",
        vec![f.clone(), f.clone()],
        Arc::new(f.clone()),
        Volatility::Immutable,
        make(Kind::Spearman),
        Arc::new(vec![list.clone(), list.clone()]),
    ));
    ctx.register_udaf(create_udaf(
        "r2_bootstrap",
        vec![f.clone(), f.clone(), i.clone(), i.clone(), f.clone()],
        Arc::new(f.clone()),
        Volatility::Immutable,
        make(Kind::Bootstrap),
        Arc::new(vec![list.clone(), list, i.clone(), i, f]),
    ));
}
