//! `oxtune rlhf --algo grpo`: prompts from a dataset, G completions each
//! from the generation engine, rewards from reward plugins (built-in,
//! native or wasm), and the GRPO policy loss on the shared training loop.

use oxtune_data::Objective;
use oxtune_train::align::grpo::GrpoObjective;
use oxtune_train::align::objective::Reference;
use oxtune_train::train_with;

use super::rlhf::{frozen_reference, grpo_config, RlhfArgs};
use super::sft::{encoder, print_samples, report, report_data, sample_answers_of, set_up, with_hint};
use super::GlobalArgs;

/// Runs `oxtune rlhf --algo grpo`.
pub fn run(global: &GlobalArgs, args: &RlhfArgs) -> anyhow::Result<()> {
    let run = &args.run;
    if run.data.packing || run.data.padding_free {
        anyhow::bail!("--packing and --padding-free train sft, pt and preference pairs; grpo scores whole rollouts");
    }
    let config = grpo_config(args)?;
    run.data.refuse_streaming("rlhf --rlhf-type grpo")?;
    let mut setup = set_up(global, run, "rlhf", args.knobs())?;
    let before = sample_answers_of(&setup.text, &run.sample_prompt, Objective::AssistantTurns)?;
    let eos = setup.text.assets.eos_token_ids.clone();
    // The rewards are checked before anything else runs: a typo must not
    // wait for the first rollout.
    GrpoObjective::new(
        config.clone(),
        &setup.registry,
        &setup.text.assets.tokenizer,
        eos.clone(),
        Reference::AdapterOff,
    )
    .map_err(anyhow::Error::msg)?;
    let options = run.data.options(run.train.seed)?;
    let data = encoder(&setup, run, &options).prepare(|e, record| e.prompt(record)).map_err(with_hint)?;
    report_data(&data, &run.data);
    let train_config = setup.start(run)?;
    let frozen = frozen_reference(&setup, run, config.beta != 0.0)?;
    let reference = frozen.as_ref().map_or(Reference::AdapterOff, Reference::Model);
    let objective = GrpoObjective::new(config, &setup.registry, &setup.text.assets.tokenizer, eos, reference)
        .map_err(anyhow::Error::msg)?;
    eprintln!("grpo: {} prompt(s), {} completions each", data.train.len(), args.grpo.num_generations);
    // GRPO has no evaluation loss: held-out prompts are not used.
    let metrics = train_with(&setup.text.model, &objective, &data.train, &[], &train_config)?;
    report(&metrics, &run.output_dir);
    let after = sample_answers_of(&setup.text, &run.sample_prompt, Objective::AssistantTurns)?;
    print_samples(&run.sample_prompt, &before, &after);
    Ok(())
}
