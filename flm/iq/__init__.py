"""The FLM-101B "IQ test": generated items (rule, pattern, interference), symbolic mapping, scoring, suite runner."""
