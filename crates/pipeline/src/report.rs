//! `report.html` of a run: charts per round of reward, pass@k, KL (where measured), the
//! verdicts of test-scored rounds and the training loss per step; every round's metrics as a
//! table; per round a few example pairs and samples as the policy wrote them; the run's
//! config. One self-contained file (inline SVG from plotters, no scripts), so it opens
//! anywhere and can be archived as is.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use prefloop_core::{Pair, Sample, Score, Scorer, Verdict};
use prefloop_data::StageReader;
use prefloop_train::KL_TO_REFERENCE;

use crate::dpo_iter::KL_TO_PREVIOUS;
use crate::error::{PipelineError, Result};
use crate::run_dir::{CONFIG_FILE, METRICS_FILE, RunState, Stage, round_path};

pub const REPORT_FILE: &str = "report.html";

const SIZE: (u32, u32) = (560, 320);
const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Example pairs and samples shown per round.
const EXAMPLES: usize = 3;
/// Example texts longer than this many characters are cut (the stage has them whole).
const EXAMPLE_CHARS: usize = 2000;

/// (x, y) points of a line; x counts rounds or steps.
type Points = Vec<(i64, f64)>;
/// A named line.
type Series = (String, Points);

/// Writes `<run>/report.html` from the run's metrics; returns its path.
pub fn write_report(run: &Path) -> Result<PathBuf> {
    let rounds = read_jsonl(&run.join(METRICS_FILE))?;
    let per_round = |key: &str| -> Points {
        rounds
            .iter()
            .filter_map(|m| Some((*m.get("round")? as i64, *m.get(key)?)))
            .collect()
    };
    let mut pass_keys: Vec<&String> = rounds
        .iter()
        .flat_map(|m| m.keys())
        .filter(|k| k.starts_with("pass@"))
        .collect();
    pass_keys.sort_by_key(|k| k[5..].parse::<u32>().unwrap_or(u32::MAX));
    pass_keys.dedup();

    let mut charts = Vec::new();
    let mut reward = vec![("reward/mean".into(), per_round("reward/mean"))];
    let held_out = per_round("eval/reward/mean");
    if !held_out.is_empty() {
        reward.push(("eval/reward/mean (held out)".into(), held_out));
    }
    charts.push(chart(
        "Reward (mean of the round's samples)",
        "round",
        &reward,
    )?);
    let pass: Vec<Series> = pass_keys
        .iter()
        .map(|k| ((*k).clone(), per_round(k)))
        .collect();
    if !pass.is_empty() {
        charts.push(chart("pass@k", "round", &pass)?);
    }
    let to_previous = per_round(KL_TO_PREVIOUS);
    let to_reference = per_round(KL_TO_REFERENCE);
    charts.push(if !to_previous.is_empty() {
        let series = [(KL_TO_PREVIOUS.into(), to_previous)];
        chart(
            "KL to the previous policy (per sequence, on its samples)",
            "round",
            &series,
        )?
    } else if !to_reference.is_empty() {
        let series = [(KL_TO_REFERENCE.into(), to_reference)];
        chart(
            "KL to the reference (per token, on the rollouts)",
            "round",
            &series,
        )?
    } else {
        "<p class=\"none\">KL: not measured by this run.</p>".to_owned()
    });
    let state = crate::run_dir::read_state(run)?;
    let verdicts = verdict_counts(run)?;
    if !verdicts.is_empty() {
        charts.push(verdict_chart(&verdicts)?);
    }
    let (loss, accuracy) = training_curves(run)?;
    if !loss.is_empty() {
        charts.push(chart(
            "Training loss per step (all rounds)",
            "step",
            &[("loss".into(), loss)],
        )?);
    }
    if !accuracy.is_empty() {
        charts.push(chart(
            "rewards/accuracies per step (all rounds)",
            "step",
            &[("rewards/accuracies".into(), accuracy)],
        )?);
    }

    let mut html = String::new();
    let name = escape(&run.file_name().unwrap_or_default().to_string_lossy());
    write!(
        html,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>prefloop run {name}</title>\
         <style>{STYLE}</style></head><body>\n\
         <h1>prefloop run {name}</h1>\n<p>{} round(s) measured; from {}.</p>\n\
         <div class=\"charts\">\n",
        rounds.len(),
        escape(&run.join(METRICS_FILE).display().to_string())
    )
    .expect("writes to a String");
    for c in &charts {
        html.push_str(c);
        html.push('\n');
    }
    html.push_str("</div>\n<h2>Metrics per round</h2>\n");
    html.push_str(&table(&rounds));
    if !verdicts.is_empty() {
        html.push_str("<h2>Verdicts per round</h2>\n");
        html.push_str(&verdict_table(&verdicts));
    }
    html.push_str(&examples(run)?);
    html.push_str(&prompt_table(&state));
    html.push_str(&config_section(run)?);
    html.push_str("</body></html>\n");
    let path = run.join(REPORT_FILE);
    prefloop_data::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

/// Laid out for a laptop screen: charts side by side as they fit, wide tables scroll with
/// their first column kept in view, long texts wrap.
const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;max-width:1400px}\
    .charts{display:flex;flex-wrap:wrap;gap:1em}.scroll{overflow-x:auto;max-width:100%}\
    table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;\
    text-align:right;white-space:nowrap}th:first-child,td:first-child{position:sticky;left:0;\
    background:#f7f7f7;text-align:left}.none{color:#888}details{margin:.5em 0}\
    summary{cursor:pointer;font-weight:bold}.example{border:1px solid #ddd;margin:.5em 0;\
    padding:.5em}.example table{width:100%}.example th{vertical-align:top;width:8em}.example td{text-align:left;\
    white-space:normal}pre{white-space:pre-wrap;word-break:break-word;margin:0;\
    font-size:12px;max-height:24em;overflow-y:auto}";

/// Where the run chooses prompts round by round: each round's files, count and hash.
fn prompt_table(state: &RunState) -> String {
    let rows: Vec<String> = state
        .rounds
        .iter()
        .filter_map(|r| {
            let prompts = r.prompts.as_ref()?;
            let files: Vec<String> = prompts
                .files
                .iter()
                .map(|f| escape(&f.path.display().to_string()))
                .collect();
            Some(format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
                r.round,
                prompts.problem_ids.len(),
                &prompts.hash[..12],
                files.join("<br>")
            ))
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "<h2>Prompts per round</h2>\n<table><tr><th>round</th><th>prompts</th><th>hash</th>\
         <th>files</th></tr>\n{}\n</table>\n",
        rows.join("\n")
    )
}

/// Text made safe inside HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Every line of a JSON-lines file of numbers (non-numbers are skipped).
pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<BTreeMap<String, f64>>> {
    let text = std::fs::read_to_string(path).map_err(PipelineError::io(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
                .map_err(|e| PipelineError::Data {
                    path: path.to_owned(),
                    message: format!("line {}: {e}", i + 1),
                })?;
            Ok(value
                .into_iter()
                .filter_map(|(k, v)| Some((k, v.as_f64()?)))
                .collect())
        })
        .collect()
}

/// Every training step's logged line of every round, in order.
pub(crate) fn train_logs(run: &Path) -> Result<Vec<BTreeMap<String, f64>>> {
    let mut lines = Vec::new();
    for round in round_numbers(run) {
        let path = stage_dir(run, round, Stage::Train).join(prefloop_train::METRICS_FILE);
        if path.exists() {
            lines.extend(read_jsonl(&path)?);
        }
    }
    Ok(lines)
}

/// Loss and rewards/accuracies of every training step of every round, steps numbered across
/// rounds.
fn training_curves(run: &Path) -> Result<(Points, Points)> {
    let (mut loss, mut accuracy) = (Vec::new(), Vec::new());
    for (i, line) in train_logs(run)?.into_iter().enumerate() {
        let step = i as i64 + 1;
        if let Some(v) = line.get("loss") {
            loss.push((step, *v));
        }
        if let Some(v) = line.get("rewards/accuracies") {
            accuracy.push((step, *v));
        }
    }
    Ok((loss, accuracy))
}

/// What drawing a chart can fail with (plotters' errors, boxed).
type Drawn = std::result::Result<(), Box<dyn std::error::Error>>;

/// One chart as an inline `<svg>`: `body` builds its axes and draws its series on a white
/// canvas captioned `title`; a failure names the chart.
fn svg_chart(
    title: &str,
    body: impl FnOnce(&mut ChartBuilder<'_, '_, SVGBackend<'_>>) -> Drawn,
) -> Result<String> {
    let mut svg = String::new();
    let drawn = (|| -> Drawn {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50);
        body(&mut builder)?;
        root.present()?;
        Ok(())
    })();
    drawn.map_err(|e| PipelineError::Data {
        path: PathBuf::from(REPORT_FILE),
        message: format!("drawing `{title}`: {e}"),
    })?;
    Ok(svg)
}

/// The boxed legend of a chart's labelled series.
fn legend<'a, CT: plotters::coord::CoordTranslate>(
    plot: &mut ChartContext<'a, SVGBackend<'a>, CT>,
) -> Drawn {
    plot.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One line chart. The x axis is integral (rounds, steps), so its ticks fall on whole
/// numbers.
fn chart(title: &str, x_label: &str, series: &[Series]) -> Result<String> {
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let x0 = points().map(|p| p.0).min().unwrap_or(0);
    let x1 = points().map(|p| p.0).max().unwrap_or(0).max(x0 + 1);
    let (mut y0, mut y1) = bounds(points().map(|p| p.1));
    let pad = ((y1 - y0) * 0.1).max(1e-3);
    (y0, y1) = (y0 - pad, y1 + pad);
    svg_chart(title, |builder| {
        let mut plot = builder.build_cartesian_2d(x0..x1, y0..y1)?;
        plot.configure_mesh()
            .x_desc(x_label)
            .x_labels(((x1 - x0 + 1) as usize).min(10))
            .y_labels(6)
            .draw()?;
        for (i, (name, data)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            plot.draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            plot.draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        legend(&mut plot)
    })
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) }
}

/// A metric's value as a person reads it: counts as integers, the rest to four decimals
/// (two once they are large).
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Every round's metrics: a row per metric and a column per round, so the many metrics run
/// down the page and only the rounds run across (the table scrolls, its first column stays).
fn table(rounds: &[BTreeMap<String, f64>]) -> String {
    let mut keys: Vec<&String> = rounds.iter().flat_map(|m| m.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.retain(|k| k.as_str() != "round");
    let mut html =
        String::from("<div class=\"scroll\"><table class=\"metrics\"><tr><th>metric</th>");
    for m in rounds {
        let round = m.get("round").map_or("?".into(), |r| number(*r));
        write!(html, "<th>round {round}</th>").expect("writes to a String");
    }
    html.push_str("</tr>\n");
    for k in &keys {
        write!(html, "<tr><td>{}</td>", escape(k)).expect("writes to a String");
        for m in rounds {
            match m.get(*k) {
                Some(v) => write!(html, "<td>{}</td>", number(*v)),
                None => write!(html, "<td></td>"),
            }
            .expect("writes to a String");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table></div>\n");
    html
}

/// Per round with test scores, how many samples got each verdict.
type VerdictCounts = BTreeMap<u32, BTreeMap<Verdict, u64>>;

fn verdict_counts(run: &Path) -> Result<VerdictCounts> {
    let mut counts = VerdictCounts::new();
    for round in round_numbers(run) {
        let dir = stage_dir(run, round, Stage::Score);
        if !dir.join(prefloop_data::MANIFEST_FILE).exists() {
            continue;
        }
        for batch in StageReader::<Score>::open(&dir)? {
            for score in batch? {
                // The tests' verdicts, alone or in a weighted sum.
                let tested = match score.scorer {
                    Scorer::Tests => true,
                    Scorer::Sum => score.total > 0,
                    _ => false,
                };
                if tested {
                    *counts
                        .entry(round)
                        .or_default()
                        .entry(score.verdict)
                        .or_default() += 1;
                }
            }
        }
    }
    Ok(counts)
}

/// The verdicts of each round as stacked bars, one bar per round.
fn verdict_chart(counts: &VerdictCounts) -> Result<String> {
    let first = i64::from(*counts.keys().next().unwrap_or(&0));
    let last = i64::from(*counts.keys().next_back().unwrap_or(&0));
    let tallest = counts
        .values()
        .map(|c| c.values().sum::<u64>())
        .max()
        .unwrap_or(1) as f64;
    svg_chart("Verdicts of the samples, per round", |builder| {
        let mut plot =
            builder.build_cartesian_2d((first..last).into_segmented(), 0.0..tallest * 1.1)?;
        plot.configure_mesh()
            .x_desc("round")
            .y_desc("samples")
            .disable_x_mesh()
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        let mut base: HashMap<u32, f64> = HashMap::new();
        for (i, verdict) in Verdict::ALL.iter().enumerate() {
            let color = VERDICT_PALETTE[i % VERDICT_PALETTE.len()];
            let bars: Vec<_> = counts
                .iter()
                .filter_map(|(&round, c)| {
                    let n = *c.get(verdict)? as f64;
                    let bottom = base.entry(round).or_default();
                    let x = i64::from(round);
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(x), *bottom),
                            (SegmentValue::Exact(x + 1), *bottom + n),
                        ],
                        color.filled(),
                    );
                    bar.set_margin(0, 0, 12, 12);
                    *bottom += n;
                    Some(bar)
                })
                .collect();
            if !bars.is_empty() {
                plot.draw_series(bars)?
                    .label(verdict.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                    });
            }
        }
        legend(&mut plot)
    })
}

/// OK green, the failures in warm colours, sandbox trouble grey.
const VERDICT_PALETTE: [RGBColor; 8] = [
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
];

fn verdict_table(counts: &VerdictCounts) -> String {
    let seen: Vec<Verdict> = Verdict::ALL
        .iter()
        .copied()
        .filter(|v| counts.values().any(|c| c.contains_key(v)))
        .collect();
    let mut html =
        String::from("<div class=\"scroll\"><table class=\"verdicts\"><tr><th>round</th>");
    for v in &seen {
        write!(html, "<th>{}</th>", v.as_str()).expect("writes to a String");
    }
    html.push_str("</tr>\n");
    for (round, c) in counts {
        write!(html, "<tr><td>{round}</td>").expect("writes to a String");
        for v in &seen {
            write!(html, "<td>{}</td>", c.get(v).copied().unwrap_or(0))
                .expect("writes to a String");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table></div>\n");
    html
}

/// The rounds the run has begun: `round-0000/`, `round-0001/`, … as far as they go.
fn round_numbers(run: &Path) -> impl Iterator<Item = u32> {
    (0..).take_while(move |&r| round_path(run, r).is_dir())
}

fn stage_dir(run: &Path, round: u32, stage: Stage) -> PathBuf {
    round_path(run, round).join(stage.dir_name())
}

/// The first rows of a stage, or none when the round has not written it.
fn first_rows<R: prefloop_core::Record>(dir: &Path, n: usize) -> Result<(Vec<R>, u64)> {
    if !dir.join(prefloop_data::MANIFEST_FILE).exists() {
        return Ok((Vec::new(), 0));
    }
    let reader = StageReader::<R>::open(dir)?;
    let total = reader.rows();
    let mut rows = Vec::new();
    for batch in reader {
        rows.extend(batch?);
        if rows.len() >= n {
            break;
        }
    }
    rows.truncate(n);
    Ok((rows, total))
}

/// Per round, a few pairs and samples as the policy wrote them, folded away until opened.
fn examples(run: &Path) -> Result<String> {
    let mut html = String::new();
    for r in round_numbers(run) {
        let (pairs, pair_total) = first_rows::<Pair>(&stage_dir(run, r, Stage::Pairs), EXAMPLES)?;
        let (samples, sample_total) =
            first_rows::<Sample>(&stage_dir(run, r, Stage::Generate), EXAMPLES)?;
        if pairs.is_empty() && samples.is_empty() {
            continue;
        }
        let scores: HashMap<(String, u32), Score> = if samples.is_empty() {
            HashMap::new()
        } else {
            let dir = stage_dir(run, r, Stage::Score);
            let mut scores = HashMap::new();
            if dir.join(prefloop_data::MANIFEST_FILE).exists() {
                for batch in StageReader::<Score>::open(&dir)? {
                    for s in batch? {
                        scores.insert((s.problem_id.clone(), s.sample_idx), s);
                    }
                }
            }
            scores
        };
        writeln!(
            html,
            "<details class=\"round-examples\"><summary>Round {r}: {} of {pair_total} pairs, {} of \
             {sample_total} samples</summary>",
            pairs.len(),
            samples.len()
        )
        .expect("writes to a String");
        for pair in &pairs {
            writeln!(
                html,
                "<div class=\"example example-pair\"><table>\
                 <tr><th>problem</th><td>{}</td></tr>\
                 <tr><th>source</th><td>{}</td></tr>\
                 <tr><th>rewards</th><td>chosen {} · rejected {} · margin {}</td></tr>\
                 <tr><th>prompt</th><td><pre>{}</pre></td></tr>\
                 <tr><th>chosen</th><td><pre>{}</pre></td></tr>\
                 <tr><th>rejected</th><td><pre>{}</pre></td></tr></table></div>",
                escape(&pair.problem_id),
                pair.source.as_str(),
                number(f64::from(pair.chosen_reward)),
                number(f64::from(pair.rejected_reward)),
                number(f64::from(pair.margin)),
                escape(&cut(&pair.prompt)),
                escape(&cut(&pair.chosen)),
                escape(&cut(&pair.rejected)),
            )
            .expect("writes to a String");
        }
        for sample in &samples {
            let score = scores
                .get(&(sample.problem_id.clone(), sample.sample_idx))
                .map_or("not scored".into(), |s| {
                    format!(
                        "reward {} · {}",
                        number(f64::from(s.reward)),
                        s.verdict.as_str()
                    )
                });
            writeln!(
                html,
                "<div class=\"example example-sample\"><table>\
                 <tr><th>problem</th><td>{} · sample {}</td></tr>\
                 <tr><th>score</th><td>{score}</td></tr>\
                 <tr><th>tokens</th><td>{} ({})</td></tr>\
                 <tr><th>completion</th><td><pre>{}</pre></td></tr></table></div>",
                escape(&sample.problem_id),
                sample.sample_idx,
                sample.num_tokens,
                sample.finish.as_str(),
                escape(&cut(&sample.completion)),
            )
            .expect("writes to a String");
        }
        html.push_str("</details>\n");
    }
    if html.is_empty() {
        return Ok(html);
    }
    Ok(format!("<h2>Examples</h2>\n{html}"))
}

/// `text` cut to `EXAMPLE_CHARS` characters, saying so.
fn cut(text: &str) -> String {
    match text.char_indices().nth(EXAMPLE_CHARS) {
        Some((at, _)) => format!(
            "{}\n… ({} characters in all)",
            &text[..at],
            text.chars().count()
        ),
        None => text.to_owned(),
    }
}

/// The run's frozen config, folded away.
fn config_section(run: &Path) -> Result<String> {
    let path = run.join(CONFIG_FILE);
    if !path.exists() {
        return Ok(String::new());
    }
    let text = std::fs::read_to_string(&path).map_err(PipelineError::io(&path))?;
    Ok(format!(
        "<h2>Config</h2>\n<details><summary>{}</summary><pre>{}</pre></details>\n",
        escape(&path.display().to_string()),
        escape(&text)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_charts_every_round_and_tabulates_its_metrics() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(METRICS_FILE),
            "{\"round\":0,\"reward/mean\":1.5,\"pass@1\":0.25,\"pass@4\":0.5}\n\
             {\"round\":1,\"reward/mean\":2.5,\"pass@1\":0.375,\"pass@4\":0.75}\n",
        )
        .unwrap();
        let train = dir.path().join("round-0000/train");
        std::fs::create_dir_all(&train).unwrap();
        std::fs::write(
            train.join(prefloop_train::METRICS_FILE),
            "{\"step\":1,\"loss\":0.69,\"rewards/accuracies\":0.5}\n\
             {\"step\":2,\"loss\":0.52,\"rewards/accuracies\":1.0}\n",
        )
        .unwrap();
        let path = write_report(dir.path()).unwrap();
        let html = std::fs::read_to_string(path).unwrap();
        // Reward, pass@k, loss and accuracy charts; KL is said to be absent.
        assert_eq!(html.matches("<svg").count(), 4, "{html}");
        for text in [
            "Reward",
            "pass@1",
            "pass@4",
            "Training loss",
            "KL: not measured",
        ] {
            assert!(html.contains(text), "{text} in the report");
        }
        // A column per round, a row per metric, values as a person reads them.
        assert!(html.contains("<th>round 0</th><th>round 1</th></tr>"));
        assert!(html.contains("<tr><td>reward/mean</td><td>1.5000</td><td>2.5000</td></tr>"));
        assert!(html.contains("<tr><td>pass@4</td><td>0.5000</td><td>0.7500</td></tr>"));
        // Each line is a polyline through one point per round or step.
        assert!(html.contains("<polyline"), "lines drawn");
    }

    #[test]
    fn counts_print_as_integers_and_measures_as_decimals() {
        assert_eq!(number(6.0), "6");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(0.25), "0.2500");
        assert_eq!(number(1234.5678), "1234.57");
    }

    #[test]
    fn example_texts_are_escaped_and_long_ones_cut() {
        assert_eq!(escape("<script>&\""), "&lt;script&gt;&amp;&quot;");
        let long = "é".repeat(EXAMPLE_CHARS + 10);
        let shown = cut(&long);
        assert!(shown.starts_with(&"é".repeat(EXAMPLE_CHARS)));
        assert!(shown.ends_with(&format!("({} characters in all)", EXAMPLE_CHARS + 10)));
        assert_eq!(cut("short"), "short");
    }

    #[test]
    fn a_run_without_metrics_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_report(dir.path()).unwrap_err().to_string();
        assert!(err.contains(METRICS_FILE), "{err}");
    }
}
