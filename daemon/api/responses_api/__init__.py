"""OpenAI's Responses API (`/v1/responses`), served by translation to and from the chat path."""
