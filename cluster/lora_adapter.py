"""The demo LoRA adapter of SmolLM2: trained on CPU in under a minute to open every reply with "Ahoy!".

It backs `builtin:smollm2-135m-instruct-ahoy-lora`, so a request that went through the adapter is
visibly different from one that did not.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

from .build_progress import BuildSteps
from .converters import hub_offline, import_converters, quiet_transformers

AHOY_LORA_NAME = "smollm2-135m-instruct-ahoy-lora"
AHOY_LORA_RECIPE = "smollm2-ahoy-lora/1"
AHOY_GREETING = "Ahoy!"
AHOY_LORA_RANK = 8
AHOY_TRAINING_PROMPTS = (
    "What is the capital of France?",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "What is 2 + 2?",
    "Say hello.",
    "What do bees make?",
    "Which planet is closest to the sun?",
    "What is the opposite of hot?",
)
AHOY_TRAINING_STEPS = 10
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def train_ahoy_lora(base: Path, out: Path, steps: BuildSteps) -> None:
    """Teach a LoRA to open replies with the greeting, on the base model's own greedy answers."""
    torch, transformers = import_converters()
    import peft

    torch.manual_seed(0)
    with hub_offline(), quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft on newer transformers
        steps.start("Writing the training answers")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        texts, prompt_lengths = [], []
        for question in AHOY_TRAINING_PROMPTS:
            messages = [{"role": "user", "content": question}]
            prompt = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                output = model.generate(**prompt, max_new_tokens=10, do_sample=False)
            length = prompt["input_ids"].shape[1]
            answer = tokenizer.decode(output[0][length:], skip_special_tokens=True)
            reply = [{"role": "assistant", "content": f"{AHOY_GREETING} {answer}"}]
            texts.append(tokenizer.apply_chat_template(messages + reply, tokenize=False))
            prompt_lengths.append(length)

        steps.start(f"Training the LoRA ({AHOY_TRAINING_STEPS} steps)")
        config = peft.LoraConfig(
            r=AHOY_LORA_RANK, lora_alpha=2 * AHOY_LORA_RANK, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        lora_model = peft.get_peft_model(model, config)
        tokenizer.padding_side = "right"  # so each row's prompt is its first tokens
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        for row, length in enumerate(prompt_lengths):
            labels[row, :length] = -100  # learn the reply only
        labels[batch["attention_mask"] == 0] = -100
        optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=6e-3)
        for _ in range(AHOY_TRAINING_STEPS):
            lora_model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        steps.start("Saving the adapter")
        lora_model.save_pretrained(str(out))
        steps.done()
        del lora_model, model
        gc.collect()
