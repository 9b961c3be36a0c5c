//! Go `flag` package spellings on top of clap, so that upstream's command lines work as
//! they are: `-listen-addr=0.0.0.0:5758`, `-data-dir /x`, a bare `-enable-sidecar-mode`,
//! `--name=value`, and booleans as Go's `strconv.ParseBool` reads them.
//!
//! clap has no single-dash long options, so the command line is rewritten before clap
//! sees it: every known long option, with one dash or two, becomes `--name=value`. The
//! names come from the clap command itself (subcommands included), so a flag added later
//! is covered without a list here. Joining a value onto its flag also gives Go's rule that
//! the word after a value-taking flag is its value even when it starts with `-`, and a bare
//! boolean never swallows the next word (Go's `-b false` is not `-b=false` either).
//! Everything after `--` is passed on unchanged (the `init` role's agent flags are
//! rewritten by the agent that receives them).

use std::ffi::OsString;

/// Go's `strconv.ParseBool`: `1 t T TRUE true True` and `0 f F FALSE false False`.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!(
            "{s:?} is not a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)"
        )),
    }
}

/// Rewrites `args` (the program name first) into the spelling clap parses for `cmd`.
pub fn normalise<I>(cmd: &clap::Command, args: I) -> Vec<OsString>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut cmd = cmd.clone();
    cmd.build();
    let mut current = &cmd;
    let mut out = Vec::new();
    let mut args = args.into_iter().map(Into::into);
    if let Some(program) = args.next() {
        out.push(program);
    }
    while let Some(arg) = args.next() {
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            out.push(arg);
            out.extend(args);
            break;
        }
        if !s.starts_with('-') {
            if let Some(sub) = current.find_subcommand(s) {
                current = sub;
            }
            out.push(arg);
            continue;
        }
        let body = s.strip_prefix("--").unwrap_or(&s[1..]);
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        // A single letter is a short option (`-h`, `-V`): clap's own syntax.
        let known = (name.len() > 1)
            .then(|| current.get_arguments().find(|a| a.get_long() == Some(name)))
            .flatten();
        let Some(flag) = known else {
            // Unknown: clap refuses it, naming it whole (`-nope` would read as `-n`).
            match name.len() > 1 && !s.starts_with("--") {
                true => out.push(format!("-{s}").into()),
                false => out.push(arg),
            }
            continue;
        };
        out.push(spelled(flag, name, value, &mut args).into());
    }
    out
}

/// One known option in clap's `--name[=value]` spelling, taking its value from the next
/// word where Go would.
fn spelled(
    flag: &clap::Arg,
    name: &str,
    value: Option<&str>,
    rest: &mut impl Iterator<Item = OsString>,
) -> String {
    if let Some(v) = value {
        return format!("--{name}={v}");
    }
    if !flag.get_action().takes_values() {
        return format!("--{name}");
    }
    let optional = flag.get_num_args().is_some_and(|n| n.min_values() == 0);
    if optional {
        // A bare boolean means true, never "true if the next word says so".
        let boolean = flag.get_value_parser().type_id() == std::any::TypeId::of::<bool>();
        return match boolean {
            true => format!("--{name}=true"),
            false => format!("--{name}"),
        };
    }
    match rest.next() {
        Some(v) => format!("--{name}={}", v.to_string_lossy()),
        // clap reports the missing value.
        None => format!("--{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{ArgAction, Parser, Subcommand};

    #[derive(Parser, Debug)]
    #[command(args_conflicts_with_subcommands = true)]
    struct Cli {
        #[command(subcommand)]
        sub: Option<Sub>,
        #[arg(long, default_value = "")]
        data_dir: String,
        #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true",
              action = ArgAction::Set, value_parser = parse_go_bool)]
        flag: bool,
        #[arg(long = "volume", value_delimiter = ',')]
        volumes: Vec<String>,
    }

    #[derive(Subcommand, Debug)]
    enum Sub {
        Run {
            #[arg(long, default_value_t = 0)]
            count: u32,
            #[arg(last = true)]
            rest: Vec<String>,
        },
    }

    fn words(args: &[&str]) -> Vec<String> {
        use clap::CommandFactory;
        normalise(
            &Cli::command(),
            std::iter::once("prog").chain(args.iter().copied()),
        )
        .into_iter()
        .skip(1)
        .map(|s| s.into_string().unwrap())
        .collect()
    }

    #[test]
    fn go_spellings_become_clap_spellings() {
        assert_eq!(words(&["-data-dir=/d"]), ["--data-dir=/d"]);
        assert_eq!(words(&["-data-dir", "/d"]), ["--data-dir=/d"]);
        assert_eq!(words(&["--data-dir", "/d"]), ["--data-dir=/d"]);
        assert_eq!(words(&["--data-dir=/d"]), ["--data-dir=/d"]);
        // Go takes the next word as the value even when it starts with a dash.
        assert_eq!(words(&["-data-dir", "-odd"]), ["--data-dir=-odd"]);
        assert_eq!(words(&["-flag"]), ["--flag=true"]);
        assert_eq!(words(&["-flag=F"]), ["--flag=F"]);
        assert_eq!(words(&["-volume", "a=/x,b=/y"]), ["--volume=a=/x,b=/y"]);
        assert_eq!(words(&["-help"]), ["--help"]);
        assert_eq!(words(&["-h"]), ["-h"]);
        // Unknown flags are left for clap to refuse, whole.
        assert_eq!(words(&["-nope=1"]), ["--nope=1"]);
        assert_eq!(words(&["--nope"]), ["--nope"]);
    }

    #[test]
    fn subcommands_and_everything_after_double_dash_keep_their_shape() {
        assert_eq!(
            words(&["run", "-count", "3", "--", "-data-dir", "/d", "-flag"]),
            ["run", "--count=3", "--", "-data-dir", "/d", "-flag"]
        );
        // The subcommand's own flags are known only inside it.
        assert_eq!(words(&["-count", "3"]), ["--count", "3"]);
    }

    #[test]
    fn parsed_results_match_go() {
        use clap::CommandFactory;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(normalise(
                &Cli::command(),
                std::iter::once("prog").chain(args.iter().copied()),
            ))
        };
        let c = parse(&["-flag", "-data-dir", "/d"]).unwrap();
        assert!(c.flag);
        assert_eq!(c.data_dir, "/d");
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert!(parse(&[&format!("-flag={t}")]).unwrap().flag, "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert!(!parse(&[&format!("--flag={f}")]).unwrap().flag, "{f}");
        }
        for bad in ["yes", "on", "tRUE", ""] {
            assert!(parse(&[&format!("-flag={bad}")]).is_err(), "{bad}");
        }
        // Go's bare boolean doesn't take the next word: it is left over, and refused.
        assert!(parse(&["-flag", "false"]).is_err());
        assert!(parse(&["-unknown"]).is_err());
    }
}
