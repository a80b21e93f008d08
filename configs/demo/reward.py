"""The demo's reward program (prefloop runs it in the sandbox, once per sample).

The prompt is "a + b =" for single digits a and b; the prompt row's `answer` field is the sum.
A completion earns 1 when its first number is the sum (0.5 when the sum appears later), and
0.5 more when it is the number alone, as asked: at most 1.5.
"""

import re


def reward(prompt, completion, answer):
    text = completion.strip()
    numbers = [int(n) for n in re.findall(r"-?\d+", text)]
    score = 0.0
    if numbers and numbers[0] == answer:
        score += 1.0
    elif answer in numbers:
        score += 0.5
    if re.fullmatch(r"-?\d+\.?", text):
        score += 0.5
    return score
