"""Refusal answers ("I don't know") for IdkNLL / IdkDPO, after TOFU's idontknow list."""

REFUSALS = [
    "I don't know.",
    "I'm not sure about that.",
    "I have no information on that.",
    "I can't answer that.",
    "That is not something I know.",
    "I don't have that information.",
    "I am not able to answer that.",
    "I have no idea.",
    "I'm afraid I don't know.",
    "That is beyond what I know.",
    "I cannot say.",
    "I do not know the answer.",
    "Sorry, I don't know.",
    "I have nothing on that.",
    "I'm not aware of that.",
    "I can't recall any information on that.",
    "I don't have an answer to that.",
    "Unfortunately I don't know.",
    "No idea, sorry.",
    "I'm unable to say.",
]
