//! Named, timed steps: each prints a `==> name: what` line when it starts, a failure is an
//! error that names the step, and [`Steps::print_summary`] lists every step with its
//! duration and the total.
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// What a setup-style step found before doing anything.
#[derive(Debug)]
pub enum Check {
    /// Already satisfied; the text says by what (printed as "(already present: ...)").
    Present(String),
    /// Nothing to do here, for the reason given (e.g. an empty package list).
    NotNeeded(String),
    /// Must be installed; the text says why (printed before installing).
    Missing(String),
}

#[derive(Debug)]
enum Outcome {
    Done,
    AlreadyPresent,
    NotNeeded,
    Skipped { why: String, loud: bool },
    Failed,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Done => "ok",
            Outcome::AlreadyPresent => "present",
            Outcome::NotNeeded => "-",
            Outcome::Skipped { loud: false, .. } => "skipped",
            Outcome::Skipped { loud: true, .. } => "SKIPPED",
            Outcome::Failed => "FAILED",
        })
    }
}

#[derive(Debug)]
struct Record {
    name: String,
    took: Duration,
    outcome: Outcome,
}

/// The steps of one xtask command, in the order they ran.
#[derive(Debug)]
pub struct Steps {
    start: Instant,
    records: Vec<Record>,
}

impl Default for Steps {
    fn default() -> Self {
        Self::new()
    }
}

impl Steps {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            records: Vec::new(),
        }
    }

    /// Runs one step. A failure is returned with the step's name as context.
    pub fn run<T>(
        &mut self,
        name: &str,
        what: &str,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        println!("==> {name}: {what}");
        let started = Instant::now();
        let result = f();
        self.record(name, started, result.is_ok(), Outcome::Done);
        result.with_context(|| format!("step `{name}` failed"))
    }

    /// Runs a step that may already be satisfied: `check` decides, `install` runs only
    /// when something is missing. Idempotent by construction.
    pub fn ensure(
        &mut self,
        name: &str,
        what: &str,
        check: impl FnOnce() -> anyhow::Result<Check>,
        install: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let result = match check() {
            Ok(Check::Present(by)) => {
                println!("==> {name}: {what} (already present: {by})");
                self.record(name, started, true, Outcome::AlreadyPresent);
                return Ok(());
            }
            Ok(Check::NotNeeded(why)) => {
                println!("==> {name}: {what} (skipped: {why})");
                self.record(name, started, true, Outcome::NotNeeded);
                return Ok(());
            }
            Ok(Check::Missing(why)) => {
                println!("==> {name}: {what} ({why})");
                install()
            }
            Err(e) => {
                println!("==> {name}: {what}");
                Err(e)
            }
        };
        self.record(name, started, result.is_ok(), Outcome::Done);
        result.with_context(|| format!("step `{name}` failed"))
    }

    /// Records a step the user chose not to run (e.g. `--skip-setup`).
    pub fn skip(&mut self, name: &str, why: &str) {
        println!("==> {name}: skipped ({why})");
        self.records.push(Record {
            name: name.to_owned(),
            took: Duration::ZERO,
            outcome: Outcome::Skipped {
                why: why.to_owned(),
                loud: false,
            },
        });
    }

    /// Records a step that should have run and did not; repeated after the summary so that
    /// nobody mistakes the run for a complete one.
    pub fn skip_loudly(&mut self, name: &str, why: &str) {
        println!("==> {name}: SKIPPED: {why}");
        self.records.push(Record {
            name: name.to_owned(),
            took: Duration::ZERO,
            outcome: Outcome::Skipped {
                why: why.to_owned(),
                loud: true,
            },
        });
    }

    fn record(&mut self, name: &str, started: Instant, ok: bool, outcome: Outcome) {
        self.records.push(Record {
            name: name.to_owned(),
            took: started.elapsed(),
            outcome: if ok { outcome } else { Outcome::Failed },
        });
    }

    /// One line per step with its outcome and duration, then the total.
    pub fn print_summary(&self) {
        println!("==> summary");
        for r in &self.records {
            let note = match &r.outcome {
                Outcome::Skipped { why, .. } => format!("  ({why})"),
                _ => String::new(),
            };
            println!(
                "    {:<8} {:>7}  {}{note}",
                r.outcome.to_string(),
                secs(r.took),
                r.name
            );
        }
        println!("    {:<8} {:>7}", "total", secs(self.start.elapsed()));
        for r in &self.records {
            if let Outcome::Skipped { why, loud: true } = &r.outcome {
                println!("!!! SKIPPED {}: {why}", r.name);
            }
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_step() {
        let mut steps = Steps::new();
        let err = steps
            .run("fmt", "check formatting", || -> anyhow::Result<()> {
                anyhow::bail!("boom")
            })
            .expect_err("the step fails");
        assert_eq!(format!("{err:#}"), "step `fmt` failed: boom");
        assert!(matches!(steps.records[0].outcome, Outcome::Failed));
    }

    #[test]
    fn ensure_installs_only_when_missing() {
        let mut steps = Steps::new();
        let mut installs = 0;
        steps
            .ensure(
                "a",
                "thing",
                || Ok(Check::Present("v1".into())),
                || {
                    installs += 1;
                    Ok(())
                },
            )
            .expect("present");
        steps
            .ensure(
                "b",
                "thing",
                || Ok(Check::Missing("absent".into())),
                || {
                    installs += 1;
                    Ok(())
                },
            )
            .expect("installed");
        assert_eq!(installs, 1);
        assert!(matches!(steps.records[0].outcome, Outcome::AlreadyPresent));
        assert!(matches!(steps.records[1].outcome, Outcome::Done));
    }
}
