"""Request bodies exactly as SillyTavern 1.12 builds them (textgen-settings.js:1097-1315).

ST forwards its whole generate body, ST-internal keys and every alias included; the
server must ignore what it does not know.
"""

from __future__ import annotations

from typing import Any

ST_PROMPT = (
    "You are Seraphina, a kind guardian of the forest.\n\nUser: Hello! Who are you?\nSeraphina:"
)


def st_body(
    api_type: str, prompt: str = ST_PROMPT, *, stream: bool = False, length: int = 24
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "model": None,
        "max_new_tokens": length,
        "max_tokens": length,
        "n_predict": length,
        "num_predict": length,
        "logprobs": None,
        "temperature": 0.7,
        "top_p": 0.9,
        "typical_p": 1,
        "typical": 1,
        "sampler_seed": 1234,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "top_k": 40,
        "skew": 0,
        "min_tokens": 0,
        "length_penalty": 1,
        "early_stopping": False,
        "add_bos_token": True,
        "smoothing_factor": 0,
        "smoothing_curve": 1,
        "dry_allowed_length": 2,
        "dry_multiplier": 0,
        "dry_base": 1.75,
        "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]',
        "dry_penalty_last_n": 0,
        "max_tokens_second": 0,
        "stopping_strings": ["\nUser:", "\nSeraphina:"],
        "stop": ["\nUser:", "\nSeraphina:"],
        "truncation_length": 2048,
        "ban_eos_token": False,
        "skip_special_tokens": True,
        "top_a": 0,
        "tfs": 1,
        "mirostat_mode": 0,
        "mirostat_tau": 5,
        "mirostat_eta": 0.1,
        "custom_token_bans": "",
        "banned_strings": [],
        "api_type": api_type,
        "api_server": "http://127.0.0.1:5001",
        "legacy_api": False,
        "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "xtc_threshold": 0.1,
        "xtc_probability": 0,
        "stream": stream,
        "rep_pen": 1.1,
        "rep_pen_range": 0,
        "repetition_penalty_range": 0,
        "repeat_last_n": 0,
        "tfs_z": 1,
        "repeat_penalty": 1.1,
        "seed": 1234,
        "num_ctx": 2048,
    }
    if api_type == "koboldcpp":
        body["grammar"] = ""
        body["grammar_string"] = ""
    else:
        body.pop("sampler_order")
        body.update(
            {
                "num_beams": 1,
                "min_length": 0,
                "encoder_repetition_penalty": 1,
                "no_repeat_ngram_size": 0,
                "penalty_alpha": 0,
                "temperature_last": True,
                "do_sample": True,
                "guidance_scale": 1,
                "negative_prompt": "",
                "grammar_string": "",
                "sampler_priority": [
                    "temperature",
                    "dynamic_temperature",
                    "quadratic_sampling",
                    "top_k",
                    "top_p",
                    "typical_p",
                    "epsilon_cutoff",
                    "eta_cutoff",
                    "tfs",
                    "top_a",
                    "min_p",
                    "mirostat",
                ],
                "epsilon_cutoff": 0,
                "eta_cutoff": 0,
            }
        )
    return body
