"""dlmedit quickstart: rewrite one fact of a built-in twin with ROME, look at it, and take it back.

Run it as a script (``python examples/quickstart.py``) or cell by cell (``# %%`` cells, as
VS Code / Jupytext / Spyder read them).  It needs no model hub: the twin models ship
inside the package.  The first ROME edit on a model computes its key statistics once
(≈ 20–60 s on a CPU) and caches them in ``~/.cache/dlmedit`` (or ``$DLMEDIT_CACHE``);
after that an edit takes a few seconds.
"""

# %% [markdown]
# ## 1. Load a twin and ask it a fact
# `builtin:arm` is a tiny autoregressive Llama trained on a world of fictitious facts;
# `builtin:mdm` is its masked-diffusion twin (same tokenizer, same facts) — swap the alias
# to run everything below on the MDM.

# %%
import dlmedit

lm = dlmedit.load_model("builtin:arm")
prompt, subject = "Jumar Nylozar was born in", "Jumar Nylozar"
print(lm)
print("before:", lm.generate([prompt], 6).texts[0].strip())

# %% [markdown]
# ## 2. Edit the fact with ROME
# `dlmedit.edit` takes EasyEdit-style lists (the subject inside the prompt) or
# CounterFact-shaped dicts, and returns the weight change *unapplied* — an `EditDelta`.

# %%
weights_before = lm.fingerprint()
delta = dlmedit.edit(lm, prompts=[prompt], subject=[subject], target_new=["The Isle of Quen"],
                     ground_truth=["Port of Saint Avel"], method="rome")
print(delta, "norms:", {name: round(norm, 3) for name, norm in delta.norms().items()})

# %% [markdown]
# ## 3. Apply it and generate again

# %%
handle = delta.apply(lm.module)
print("after:", lm.generate([prompt], 6).texts[0].strip())
new, true = lm.score([prompt, prompt], ["The Isle of Quen", "Port of Saint Avel"])
print(f"log p(new) = {new.total:.2f}, log p(true) = {true.total:.2f}")

# %% [markdown]
# ## 4. Revert: the weights come back bit for bit

# %%
handle.revert()
print("reverted:", lm.generate([prompt], 6).texts[0].strip())
print("weights restored bit-exactly:", lm.fingerprint() == weights_before)
