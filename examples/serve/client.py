"""Talk to `slimtune serve` with the official openai client (pip install openai).

    slimtune serve --model smollm2-135m --adapter acme-v1=runs/v1/best --adapter acme-v2=runs/v2/best \\
        --keys examples/serve/keys.yaml
    python examples/serve/client.py
"""
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-acme-change-me-0001")
print([m.id for m in client.models.list()])  # only what this key may use

# an adapter by name
out = client.chat.completions.create(model="acme-v1", temperature=0, max_tokens=48,
                                     messages=[{"role": "user", "content": "Is 'a clumsy, overlong mess' a review?"}])
print(out.choices[0].message.content)

# an A/B route: the arm is sticky per user and named in a response header
raw = client.chat.completions.with_raw_response.create(model="acme-support", user="customer-42", max_tokens=48,
                                                       messages=[{"role": "user", "content": "Hello!"}])
print(raw.headers["x-slimtune-adapter"], raw.parse().choices[0].message.content)

# streaming
for chunk in client.chat.completions.create(model="acme-v2", stream=True, max_tokens=48,
                                            messages=[{"role": "user", "content": "Tell me a short story."}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
