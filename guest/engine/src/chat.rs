//! Chat prompt formats. Templates are hand-written per family (no Jinja): the
//! family is recognised from the model's `tokenizer.chat_template`, else from
//! its architecture.
//!
//! Known families: Gemma (`<start_of_turn>`), Llama 3 (`<|start_header_id|>`),
//! ChatML (`<|im_start|>`: Qwen2, SmolLM, many fine-tunes), Llama 2 / Mistral
//! (`[INST]`) and Zephyr (`<|user|>`: TinyLlama-Chat).

use alloc::string::String;

use crate::gguf::Gguf;
use crate::model::Arch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, Copy)]
pub struct Message<'m> {
    pub role: Role,
    pub content: &'m str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    Gemma,
    Llama3,
    ChatMl,
    Llama2,
    Zephyr,
}

impl ChatTemplate {
    /// The template of a model: from its Jinja template's markers, else by architecture.
    pub fn for_model(gguf: &Gguf<'_>, arch: Arch) -> ChatTemplate {
        gguf.get_str("tokenizer.chat_template")
            .and_then(Self::detect)
            .unwrap_or(match arch {
                Arch::Gemma3 => ChatTemplate::Gemma,
                Arch::Llama | Arch::Qwen2 => ChatTemplate::ChatMl,
            })
    }

    /// Recognises a family from the markers in a Jinja chat template.
    pub fn detect(jinja: &str) -> Option<ChatTemplate> {
        let has = |s: &str| jinja.contains(s);
        Some(if has("<start_of_turn>") {
            ChatTemplate::Gemma
        } else if has("<|start_header_id|>") {
            ChatTemplate::Llama3
        } else if has("<|im_start|>") {
            ChatTemplate::ChatMl
        } else if has("<|user|>") {
            ChatTemplate::Zephyr
        } else if has("[INST]") {
            ChatTemplate::Llama2
        } else {
            return None;
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ChatTemplate::Gemma => "gemma",
            ChatTemplate::Llama3 => "llama3",
            ChatTemplate::ChatMl => "chatml",
            ChatTemplate::Llama2 => "llama2",
            ChatTemplate::Zephyr => "zephyr",
        }
    }

    /// One user turn (after an optional system message), ready for the reply.
    pub fn render_turn(self, system: Option<&str>, user: &str) -> String {
        let mut messages = alloc::vec::Vec::with_capacity(2);
        if let Some(content) = system {
            messages.push(Message {
                role: Role::System,
                content,
            });
        }
        messages.push(Message {
            role: Role::User,
            content: user,
        });
        self.render(&messages, true)
    }

    /// Renders a conversation (without BOS: the tokenizer adds it) and, with
    /// `add_generation_prompt`, the opening of the assistant's next turn.
    pub fn render(self, messages: &[Message<'_>], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        match self {
            ChatTemplate::Gemma => {
                // Gemma has no system role: the system text opens the first user turn.
                let mut system: Option<&str> = None;
                for m in messages {
                    match m.role {
                        Role::System => system = Some(m.content),
                        Role::User | Role::Assistant => {
                            let role = if m.role == Role::User {
                                "user"
                            } else {
                                "model"
                            };
                            out.push_str("<start_of_turn>");
                            out.push_str(role);
                            out.push('\n');
                            if let Some(s) = system.take() {
                                out.push_str(s);
                                out.push_str("\n\n");
                            }
                            out.push_str(m.content.trim());
                            out.push_str("<end_of_turn>\n");
                        }
                    }
                }
                if add_generation_prompt {
                    out.push_str("<start_of_turn>model\n");
                }
            }
            ChatTemplate::Llama3 => {
                for m in messages {
                    out.push_str("<|start_header_id|>");
                    out.push_str(role_name(m.role));
                    out.push_str("<|end_header_id|>\n\n");
                    out.push_str(m.content.trim());
                    out.push_str("<|eot_id|>");
                }
                if add_generation_prompt {
                    out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
            ChatTemplate::ChatMl => {
                for m in messages {
                    out.push_str("<|im_start|>");
                    out.push_str(role_name(m.role));
                    out.push('\n');
                    out.push_str(m.content);
                    out.push_str("<|im_end|>\n");
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
            ChatTemplate::Zephyr => {
                for m in messages {
                    out.push_str("<|");
                    out.push_str(role_name(m.role));
                    out.push_str("|>\n");
                    out.push_str(m.content);
                    out.push_str("</s>\n");
                }
                if add_generation_prompt {
                    out.push_str("<|assistant|>\n");
                }
            }
            ChatTemplate::Llama2 => {
                let mut system: Option<&str> = None;
                let mut first = true;
                for m in messages {
                    match m.role {
                        Role::System => system = Some(m.content),
                        Role::User => {
                            if !first {
                                out.push_str("<s>");
                            }
                            out.push_str("[INST] ");
                            if let Some(s) = system.take() {
                                out.push_str("<<SYS>>\n");
                                out.push_str(s);
                                out.push_str("\n<</SYS>>\n\n");
                            }
                            out.push_str(m.content.trim());
                            out.push_str(" [/INST]");
                            first = false;
                        }
                        Role::Assistant => {
                            out.push(' ');
                            out.push_str(m.content.trim());
                            out.push_str(" </s>");
                        }
                    }
                }
            }
        }
        out
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_turns() {
        let msgs = [
            Message {
                role: Role::System,
                content: "Be brief.",
            },
            Message {
                role: Role::User,
                content: "Hi",
            },
            Message {
                role: Role::Assistant,
                content: "Hello!",
            },
            Message {
                role: Role::User,
                content: "Why is the sky blue?",
            },
        ];
        assert_eq!(
            ChatTemplate::Gemma.render(&msgs, true),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn detects_families() {
        assert_eq!(
            ChatTemplate::detect("{{ '<start_of_turn>' + role }}"),
            Some(ChatTemplate::Gemma)
        );
        assert_eq!(
            ChatTemplate::detect("<|im_start|>"),
            Some(ChatTemplate::ChatMl)
        );
        assert_eq!(
            ChatTemplate::detect("<|start_header_id|>"),
            Some(ChatTemplate::Llama3)
        );
        assert_eq!(ChatTemplate::detect("[INST]"), Some(ChatTemplate::Llama2));
        assert_eq!(ChatTemplate::detect("{{ messages }}"), None);
        let m = [Message {
            role: Role::User,
            content: "x",
        }];
        assert_eq!(
            ChatTemplate::ChatMl.render(&m, true),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ChatTemplate::Llama3.render(&m, true),
            "<|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }
}
