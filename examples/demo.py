"""Optimize a small ConvNeXt-style model and print its plan and verification report.

    python examples/demo.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import convrewrite  # noqa: E402


def main():
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3), include_top=False)
    plan = convrewrite.plan(model)
    print(plan.summary())
    fast = convrewrite.optimize(model, plan=plan)
    print()
    print(fast.convrewrite_report.summary())


if __name__ == "__main__":
    main()
