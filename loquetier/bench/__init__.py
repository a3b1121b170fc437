"""Load generation and measurement against OpenAI-compatible servers (`loquetier bench serve`)."""
