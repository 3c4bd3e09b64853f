"""unbounded-agent ops: AgentUpgrade and AgentReset for the Unbounded cluster agent.

Each module is one noun of the domain and imports only what it needs, so the small
executables in bin/ pay start-up time only for what they use.
"""
