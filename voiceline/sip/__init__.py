"""SIP signalling: messages, SDP, transports, transactions, dialogs, the user agent."""
