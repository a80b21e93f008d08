//! The records of DESIGN §3. Column names and types are a public contract: change them only
//! with a migration note, since other tools read our shards by these names.
//!
//! Migration notes:
//! - pairs gained `chosen_finish` and `rejected_finish` (nullable strings, last): how each
//!   sampled answer ended. Older pairs stages and other tools' files without them read as
//!   null (an answer closed by the end-of-turn token, as before).
//! - `finish` gained `stop_string` beside `stop` and `length`: `stop` now means the policy
//!   sampled EOS. In older shards `stop` also covers stop strings.

use crate::labels::{Finish, PairSource, ProblemSource, Scorer, Verdict};
use crate::record::record;

/// One unit test: what the program reads and what it must print (or, for call-based problems,
/// the JSON-encoded arguments and return value; for HumanEval/MBPP, the `check` program).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCase {
    pub input: String,
    pub output: String,
}

record! {
    /// A task to sample answers for: a coding problem with tests, or a dialogue prompt.
    pub struct Problem as "problems" {
        pub problem_id: String,
        pub source: ProblemSource,
        pub prompt: String,
        pub tests: Vec<TestCase>,
        /// The function to call for call-based problems (APPS `fn_name`, HumanEval entry point).
        pub fn_name: Option<String>,
        pub starter_code: String,
        /// A known-good answer: the chosen side of a pair when no sample passes.
        pub reference_solution: Option<String>,
        pub difficulty: String,
        /// None where the dataset does not say.
        pub time_limit_ms: Option<u32>,
        /// None where the dataset does not say.
        pub memory_limit_bytes: Option<u64>,
    }
}

record! {
    /// One completion sampled from a policy.
    pub struct Sample as "samples" {
        pub problem_id: String,
        pub prompt: String,
        pub completion: String,
        /// Index among the samples drawn for this prompt in this round.
        pub sample_idx: u32,
        pub round: u32,
        /// Checkpoint id of the policy that sampled it.
        pub policy: String,
        pub seed: u64,
        /// Completion length in tokens: those sampled, the end-of-sequence token excluded and
        /// the tokens of a stop string included (the text is cut before it, the count is not).
        pub num_tokens: u32,
        /// Sum of log π(token | prefix) over those `num_tokens` tokens under the sampling
        /// policy's own distribution: temperature 1 and the whole vocabulary (before top-k,
        /// top-p and the temperature the sample was drawn at), the end-of-sequence token
        /// excluded. The policy's log-likelihood of its tokens, not the log-probability of the
        /// draw.
        pub logprob_sum: f32,
        pub finish: Finish,
    }
}

record! {
    /// The score of one sample, keyed by (problem_id, sample_idx, round).
    pub struct Score as "scores" {
        pub problem_id: String,
        pub sample_idx: u32,
        pub round: u32,
        pub reward: f32,
        pub scorer: Scorer,
        /// Tests passed (0 for a reward-model score).
        pub passed: u32,
        /// Tests run (0 for a reward-model score).
        pub total: u32,
        pub verdict: Verdict,
        pub wall_ms: f32,
    }
}

record! {
    /// A preference pair in TRL's column names (`prompt`, `chosen`, `rejected`).
    pub struct Pair as "pairs" {
        pub prompt: String,
        pub chosen: String,
        pub rejected: String,
        pub chosen_reward: f32,
        pub rejected_reward: f32,
        /// chosen_reward - rejected_reward.
        pub margin: f32,
        pub problem_id: String,
        pub round: u32,
        pub source: PairSource,
        /// How generation of the chosen answer ended, where it was sampled (null for a
        /// reference solution, a human-written answer, or another tool's file): an answer cut
        /// at the token budget (`length`) or at a stop string is trained on as sampled, without
        /// an end-of-sequence token; any other ends with one.
        pub chosen_finish: Option<Finish>,
        /// How generation of the rejected answer ended, as `chosen_finish`.
        pub rejected_finish: Option<Finish>,
    }
}

impl Pair {
    /// Whether the policy ended an answer that finished as `finish` (None: not sampled, so
    /// a whole answer): it is then trained on closed by the end-of-sequence token.
    pub fn ended(finish: Option<Finish>) -> bool {
        finish.is_none_or(|f| f == Finish::Stop)
    }
}

record! {
    /// The reference model's sequence log-probs of one pair, computed once before DPO trains
    /// (TRL's `ref_chosen_logps` / `ref_rejected_logps`), so the reference is never in memory
    /// while the policy trains. `pair` is the row's position in its pairs stage.
    pub struct ReferenceLogps as "reference_logps" {
        pub pair: u64,
        pub problem_id: String,
        pub ref_chosen_logps: f32,
        pub ref_rejected_logps: f32,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{
        ArrayRef, Int64Array, LargeStringArray, RecordBatch, StringArray, UInt32Array,
    };
    use arrow_schema::{DataType, Field, Schema};

    use super::*;
    use crate::{Record, RecordError, conform};

    pub(crate) fn problem(i: u32) -> Problem {
        Problem {
            problem_id: format!("apps/{i:04}"),
            source: ProblemSource::Apps,
            prompt: "Read n; print n².\n".into(),
            tests: (0..i % 3)
                .map(|t| TestCase {
                    input: format!("{t}\n"),
                    output: format!("{}\n", t * t),
                })
                .collect(),
            fn_name: i.is_multiple_of(2).then(|| "solve".into()),
            starter_code: String::new(),
            reference_solution: (i % 3 == 1).then(|| "print(int(input())**2)".into()),
            difficulty: "interview".into(),
            time_limit_ms: (i % 2 == 1).then_some(2000),
            memory_limit_bytes: i.is_multiple_of(2).then_some(256 << 20),
        }
    }

    fn sample(i: u32) -> Sample {
        Sample {
            problem_id: format!("p{}", i / 4),
            prompt: "Say hi".into(),
            completion: format!("hi ✓ {i}"),
            sample_idx: i % 4,
            round: 2,
            policy: "round-0001".into(),
            seed: u64::MAX - i as u64,
            num_tokens: 3 + i,
            logprob_sum: -1.5 * i as f32,
            finish: if i.is_multiple_of(2) {
                Finish::Stop
            } else {
                Finish::Length
            },
        }
    }

    fn score(i: u32) -> Score {
        Score {
            problem_id: format!("p{i}"),
            sample_idx: i,
            round: 0,
            reward: 10.0 * (i % 2) as f32,
            scorer: Scorer::Tests,
            passed: i,
            total: 10,
            verdict: Verdict::ALL[i as usize % Verdict::ALL.len()],
            wall_ms: 0.25,
        }
    }

    fn pair(i: u32) -> Pair {
        Pair {
            prompt: format!("prompt {i}"),
            chosen: "good".into(),
            rejected: "bad".into(),
            chosen_reward: 10.0,
            rejected_reward: 0.0,
            margin: 10.0,
            problem_id: format!("p{i}"),
            round: i,
            source: if i.is_multiple_of(2) {
                PairSource::Policy
            } else {
                PairSource::Reference
            },
            chosen_finish: i.is_multiple_of(2).then_some(Finish::Stop),
            rejected_finish: [None, Some(Finish::Length), Some(Finish::StopString)][i as usize % 3],
        }
    }

    fn round_trip<R: Record + std::fmt::Debug + PartialEq>(rows: Vec<R>) {
        let batch = R::to_batch(&rows).unwrap();
        assert_eq!(batch.schema(), R::schema());
        assert_eq!(R::from_batch(&batch).unwrap(), rows);
    }

    #[test]
    fn every_record_round_trips_through_arrow() {
        round_trip((0..7).map(problem).collect());
        round_trip((0..7).map(sample).collect());
        round_trip((0..9).map(score).collect());
        round_trip((0..5).map(pair).collect());
        round_trip(Vec::<Sample>::new());
    }

    #[test]
    fn schemas_have_the_design_columns_in_order() {
        let names = |s: arrow_schema::SchemaRef| {
            s.fields()
                .iter()
                .map(|f| f.name().clone())
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            names(Sample::schema()),
            "problem_id,prompt,completion,sample_idx,round,policy,seed,num_tokens,logprob_sum,finish"
        );
        assert_eq!(
            names(Score::schema()),
            "problem_id,sample_idx,round,reward,scorer,passed,total,verdict,wall_ms"
        );
        assert_eq!(
            names(Pair::schema()),
            "prompt,chosen,rejected,chosen_reward,rejected_reward,margin,problem_id,round,source,\
             chosen_finish,rejected_finish"
        );
        assert_eq!(
            names(Problem::schema()),
            "problem_id,source,prompt,tests,fn_name,starter_code,reference_solution,difficulty,\
             time_limit_ms,memory_limit_bytes"
        );
    }

    #[test]
    fn conform_accepts_other_tools_types_and_extra_columns() {
        // What pyarrow writes for a pairs table built from Python ints and large strings.
        let rows: Vec<Pair> = (0..3).map(pair).collect();
        let ours = Pair::to_batch(&rows).unwrap();
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for (field, column) in ours.schema().fields().iter().zip(ours.columns()) {
            let (field, column): (Field, ArrayRef) = match field.data_type() {
                DataType::Utf8 => (
                    Field::new(field.name(), DataType::LargeUtf8, true),
                    arrow_cast::cast(column, &DataType::LargeUtf8).unwrap(),
                ),
                DataType::UInt32 => (
                    Field::new(field.name(), DataType::Int64, true),
                    arrow_cast::cast(column, &DataType::Int64).unwrap(),
                ),
                _ => (field.as_ref().clone().with_nullable(true), column.clone()),
            };
            fields.push(field);
            columns.push(column);
        }
        fields.insert(0, Field::new("extra", DataType::Utf8, true));
        columns.insert(0, Arc::new(StringArray::from(vec!["x"; 3])));
        let theirs = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let back = Pair::from_batch(&conform(&theirs, &Pair::schema()).unwrap()).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn a_pairs_file_without_the_finish_columns_reads_them_as_null() {
        let rows: Vec<Pair> = (0..3).map(pair).collect();
        let ours = Pair::to_batch(&rows).unwrap();
        let keep: Vec<usize> = (0..ours.num_columns())
            .filter(|&i| !ours.schema().field(i).name().ends_with("_finish"))
            .collect();
        let theirs = ours.project(&keep).unwrap();
        let back = Pair::from_batch(&conform(&theirs, &Pair::schema()).unwrap()).unwrap();
        let expected: Vec<Pair> = rows
            .into_iter()
            .map(|p| Pair {
                chosen_finish: None,
                rejected_finish: None,
                ..p
            })
            .collect();
        assert_eq!(back, expected);
        assert!(Pair::ended(None) && Pair::ended(Some(Finish::Stop)));
        assert!(!Pair::ended(Some(Finish::Length)) && !Pair::ended(Some(Finish::StopString)));
    }

    #[test]
    fn conform_reads_list_of_struct_written_with_nullable_fields() {
        let rows: Vec<Problem> = (0..6).map(problem).collect();
        let ours = Problem::to_batch(&rows).unwrap();
        let loose = DataType::List(Arc::new(Field::new(
            "element",
            DataType::Struct(
                vec![
                    Field::new("input", DataType::LargeUtf8, true),
                    Field::new("output", DataType::LargeUtf8, true),
                ]
                .into(),
            ),
            true,
        )));
        let tests = ours.column_by_name("tests").unwrap();
        let mut columns = ours.columns().to_vec();
        columns[3] = arrow_cast::cast(tests, &loose).unwrap();
        let mut fields: Vec<Field> = ours
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[3] = Field::new("tests", loose, true);
        let theirs = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let back = Problem::from_batch(&conform(&theirs, &Problem::schema()).unwrap()).unwrap();
        assert_eq!(back, rows);
    }

    fn named_columns(batch: &RecordBatch) -> Vec<(String, ArrayRef)> {
        let schema = batch.schema();
        let names = schema.fields().iter().map(|f| f.name().clone());
        names.zip(batch.columns().iter().cloned()).collect()
    }

    fn batch_of(columns: Vec<(String, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns).unwrap()
    }

    #[test]
    fn missing_and_mistyped_columns_are_named() {
        let rows: Vec<Score> = (0..2).map(score).collect();
        let batch = Score::to_batch(&rows).unwrap();
        let without = batch.project(&[0, 1, 2, 3, 4, 5, 6, 8]).unwrap();
        let err = conform(&without, &Score::schema()).unwrap_err();
        assert!(matches!(&err, RecordError::MissingColumn { column, .. } if column == "verdict"));
        assert!(err.to_string().contains("`verdict`"), "{err}");

        let mut columns = named_columns(&batch);
        columns[2].1 = Arc::new(StringArray::from(vec!["zero", "one"]));
        let err = conform(&batch_of(columns), &Score::schema()).unwrap_err();
        assert!(matches!(&err, RecordError::ColumnType { column, .. } if column == "round"));
        assert!(err.to_string().contains("`round`"), "{err}");
    }

    #[test]
    fn bad_values_name_the_row_and_column() {
        let batch = Score::to_batch(&(0..4).map(score).collect::<Vec<_>>()).unwrap();
        let mut columns = named_columns(&batch);

        columns[7].1 = Arc::new(StringArray::from(vec!["OK", "WA", "MAYBE", "RE"]));
        let err =
            Score::from_batch(&conform(&batch_of(columns.clone()), &Score::schema()).unwrap())
                .unwrap_err()
                .at_offset(100);
        assert_eq!(
            err.to_string(),
            "row 103, column `verdict`: `MAYBE` is not a Verdict; expected one of \
             OK, WA, TLE, MLE, RE, CE, OLE, SANDBOX_ERROR"
        );

        columns[7].1 = Arc::new(LargeStringArray::from(vec![
            Some("OK"),
            None,
            Some("OK"),
            None,
        ]));
        let err = conform(&batch_of(columns.clone()), &Score::schema()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "row 2, column `verdict`: null in a non-nullable column"
        );

        columns[7].1 = batch.column(7).clone();
        columns[1].1 = Arc::new(Int64Array::from(vec![0, 1, -5, 3]));
        let err = conform(&batch_of(columns.clone()), &Score::schema()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "row 3, column `sample_idx`: value does not fit UInt32"
        );

        columns[1].1 = Arc::new(UInt32Array::from(vec![0, 1, 2, 3]));
        assert!(conform(&batch_of(columns), &Score::schema()).is_ok());
    }
}
