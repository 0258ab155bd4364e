//! What the clients ask: the chat messages of request `i` in each workload.

use serde_json::{json, Value as Json};

/// `plain`: one user message, the `--prompt` text numbered per request (the load test's first
/// workload). `shared-system`: a fixed system prompt of about 400 tokens, the same in every
/// request (a device description and tool list, as an on-device assistant would carry), then a
/// short question that varies per request: the case where a server's prompt cache pays.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Plain,
    SharedSystem,
}

impl Workload {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(Self::Plain),
            "shared-system" => Ok(Self::SharedSystem),
            _ => Err(format!("--workload plain|shared-system, not {s}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::SharedSystem => "shared-system",
        }
    }
}

/// 405 tokens in Qwen2's tokenizer; 413 as the whole prompt of a request with no user message.
pub const SYSTEM_PROMPT: &str = include_str!("system_prompt.txt");

/// Questions that make the model talk for a while (there is no "ignore eos" in our protocol),
/// all about the device the system prompt describes. Request `i` asks question `i % 16` with
/// its own ticket number, so no two prompts of a run are identical and the shared part ends
/// with the system prompt.
const QUESTIONS: [&str; 16] = [
    "The humidity at the top sensor has read 95 % since dawn. What could cause it and what should I check first?",
    "Explain how the vents, the screen and the heating work together on a cold, sunny morning.",
    "Slab 2 shows an EC of 4.1 while the other slabs are near 3. What might be going on?",
    "Walk me through what you would do if the battery alarm fires during the night.",
    "Why does CO2 dosing stop when the vents open, and what does that mean for the plants?",
    "The night temperature dropped to 15 C. Which settings or parts would you look at?",
    "Describe a good daily routine for checking this greenhouse with your tools.",
    "Irrigation zone 3 seems to drain far less than the others. Suggest possible reasons.",
    "Summarise the setpoints in force and say which ones matter most in summer.",
    "How would you tell a faulty humidity sensor from a real humidity problem?",
    "Tomorrow will be hot and bright. How should the controller prepare for it?",
    "The fans are loud and one seems slower than the other. What can I check?",
    "Explain the humidity deficit setpoint in simple words, with an example.",
    "Which alarms should wake me up at night, and which can wait until morning?",
    "The substrate moisture in slab 4 keeps falling after each irrigation. Why?",
    "Give me advice on saving heating energy without harming the tomato crop.",
];

/// The chat messages of request `i`.
pub fn messages(workload: Workload, prompt: &str, i: usize) -> Json {
    match workload {
        // Each prompt differs after the chat template's default system prompt, so the sessions'
        // prefix reuse helps as it would in real use, not more.
        Workload::Plain => json!([{"role": "user", "content": format!("{prompt} (request {i})")}]),
        Workload::SharedSystem => json!([
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": format!("Ticket {i}: {}", QUESTIONS[i % QUESTIONS.len()])},
        ]),
    }
}

/// The messages of the probe that measures the system prompt alone (after every level, so it
/// warms no cache that a level measures).
pub fn system_only() -> Json {
    json!([{"role": "system", "content": SYSTEM_PROMPT}])
}
