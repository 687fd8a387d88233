"""data.py: GSM8K-style reasoning data (work in progress; generator and splits follow)."""

PROMPT = "Question: {question}\nAnswer:\n"  # a path y is the text that follows the prompt; EOS ends it


def format_prompt(question: str) -> str:
    """The prompt every model sees before a reasoning path (same for all tokenizers)."""
    return PROMPT.format(question=question.strip())
