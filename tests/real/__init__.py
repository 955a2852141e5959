"""The real upstream servers (pinned releases) and the fake model behind them."""
